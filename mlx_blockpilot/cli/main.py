"""``mlx-blockpilot COMMAND [ARGS]``: one entry point for every command."""

import importlib
import sys

# command -> (module under mlx_blockpilot.cli, what it does)
COMMANDS = {
    "chat": ("chat", "multi-turn chat in the terminal"),
    "generate": ("generate", "generate an answer to one prompt"),
    "server": ("server", "an OpenAI-compatible HTTP server"),
    "convert": ("convert", "convert a target, a DFlash drafter and a policy into one bundle"),
    "calibrate": ("calibrate", "measure what a round costs on this machine"),
    "export": ("export", "a bundle for vLLM or SGLang, with the launch command"),
    "bench": ("bench", "benchmark against mlx-lm and the official DFlash backend"),
    "sweep": ("sweep", "decode prompts at every candidate block size (policy training data)"),
    "train_policy": ("train_policy", "train a BlockPilot policy from a sweep"),
    "train_draft": ("train_draft", "train a DFlash drafter by self-distillation"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: mlx-blockpilot COMMAND [ARGS]   (mlx-blockpilot COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mlx_blockpilot.cli.{COMMANDS[name][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
