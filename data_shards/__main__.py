"""``python -m data_shards <command> ...``: one CLI for every shard builder."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import List, Optional

from user_dist.data_format import ShardError


def build_parser() -> argparse.ArgumentParser:
    from data_shards import clip_features, karpathy, precomp, synthetic

    parser = argparse.ArgumentParser(
        prog="python -m data_shards",
        description="Build WebDataset shards (one sample per image, one or more captions) for user-dist. "
                    "See docs/data.md.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (karpathy, precomp, synthetic, clip_features):
        module.register(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from data_shards.writer import BuildError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (BuildError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        # ShardWriter removed what it had written of the failing split.
        where = f" while writing under {args.out}" if getattr(args, "out", None) else ""
        print(f"error: {exc}{where}. The shards of the split being written were removed and no manifest.json "
              f"was written for it (splits finished before are complete). Free space, then run the same "
              f"command again (with --overwrite to rebuild the finished splits too)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
