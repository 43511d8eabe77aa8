"""Builders that turn datasets into the project's WebDataset shards.

Run ``python -m data_shards <karpathy|precomp|synthetic|clip> --help``; the
format is described in :mod:`user_dist.data_format` and docs/data.md.
"""

# Recorded in every manifest; bump when the shard or manifest layout changes.
TOOL_VERSION = "2"  # 2: manifest shard entries carry num_captions and max_captions
