"""Ship what searches found: put the records they changed into the package's records, in place.

    python scripts/ship_records.py --seed DIR --mcpu x86-64-v4 --num-cores 1
    ...search DIR with scripts/tune_records.py (--num-cores 1 --retune), time it...
    python scripts/ship_records.py --mcpu x86-64-v4 --num-cores 1 DIR [DIR ...]

``--seed DIR`` writes the records a build for that level and core count reads today. After a search
from them, a record of DIR whose schedule differs from the seed's is one the search found: only
those go into the shipped folder for that core count (``<level>/1-core/`` for one core, ``<level>/``
for more), added or replacing that folder's own; every other shipped record stays as it is. So the
shipped folders change by what was found, and never by a seed's record put back over a newer one.

Time the searched folder beside the shipped records before and after (``scripts/bench_layouts.py``
with ``--records``), and run ``tests/archive/test_records.py``: what ships is what builds take.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fastinfer.archive import shipped, tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("searched", nargs="*", type=Path, help="folders tune_records.py searched")
    parser.add_argument("--mcpu", default="x86-64-v4")
    parser.add_argument("--num-cores", type=int, required=True, help="1, or the core count of all-core records")
    parser.add_argument("--seed", type=Path, help="write the records builds read today into this folder, and stop")
    args = parser.parse_args()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    target = {"kind": "llvm", "mcpu": args.mcpu, "num-cores": args.num_cores}
    if args.seed:
        args.seed.mkdir(parents=True, exist_ok=True)
        shipped.unpack(shipped.folders_for(target), args.seed)
        print(f"{args.seed}: {tuning.database_summary(args.seed)['records']} records")
    elif args.searched:
        for folder in args.searched:
            if not (folder / tuning.RECORDS_FILE).is_file():
                parser.error(f"{folder}: no {tuning.RECORDS_FILE} (not a folder tune_records.py searched)")
        try:
            found = shipped.put_found(target, args.searched)
        except ValueError as error:
            parser.error(str(error))
        where = shipped.own_folder(target).relative_to(shipped.SHIPPED_RECORDS)
        print(f"{where}: {found} records the search found put in")
    else:
        parser.error("name the searched folders (or --seed DIR)")


if __name__ == "__main__":
    main()
