"""``python -m mlx_blockpilot.server``: serve a bundle over an OpenAI-compatible HTTP API."""

import sys
from pathlib import Path

from ..errors import BlockPilotError
from ..openai_server import make_server
from ..options import GenerationOptions
from .common import add_model_args, calibrate_if_needed, fail, load_from_args, parser


def build_parser():
    p = parser("server", __doc__.split(": ", 1)[1])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this get 429")
    p.add_argument("--model-name", help="the model id reported by /v1/models (default: the bundle's name)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.max_queue < 1:
            raise BlockPilotError(f"--max-queue must be >= 1, got {args.max_queue}")
        if not 0 <= args.port <= 65535:
            raise BlockPilotError(f"--port must be in 0..65535 (0 picks a free one), got {args.port}")
        bundle = load_from_args(args)
        calibrate_if_needed(bundle, GenerationOptions())  # now, not inside the first request
        name = args.model_name or Path(args.model or args.target).resolve().name
        server = make_server(bundle, args.host, args.port, args.max_queue, name, args.verbose)
    except BlockPilotError as e:
        return fail(e)
    except OSError as e:
        return fail(BlockPilotError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"))
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
