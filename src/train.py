"""Train the MMDiT: ``torchrun --nproc_per_node N src/train.py --config tiny [key=value ...]`` (or plain python).

Every rank runs this file; the topology in the config decides which ranks load data and which train.
Any exception on any rank ends that process with its error and a non-zero code at once, so torchrun
tears the whole job down instead of leaving the other ranks hanging in a collective.
"""

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmdit.config import ConfigError, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.total_steps=100 data.batch_size=8")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"[rank {rank}] config error: {err}", file=sys.stderr, flush=True)
        os._exit(2)

    from mmdit.train import run

    try:
        code = run(cfg)
    except ConfigError as err:  # e.g. a resume whose data layout differs: one message, no traceback
        print(f"[rank {rank}] config error: {err}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(2)
    except BaseException:  # noqa: BLE001 - any failure must end this rank now, loudly
        print(f"[rank {rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    print(f"[rank {rank}] exiting with code {code}", flush=True)
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
