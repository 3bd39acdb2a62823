"""mlx_blockpilot: lossless DFlash speculative decoding in MLX with a per-prompt block size."""
