"""The export command (its code lives in llara_fast.io.export):

    python -m llara_fast.export --checkpoint SRC --out DIR [--dtype fp32|bf16] [--max-shard-size 5GB] [--max-len 512]
"""
import sys

from llara_fast.io.export import main

if __name__ == "__main__":
    sys.exit(main())
