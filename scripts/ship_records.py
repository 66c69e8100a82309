"""Ship what searches found: put the records they changed into the package's records, in place.

    python scripts/ship_records.py --seed DIR --mcpu x86-64-v4 --num-cores 1
    ...search DIR with scripts/tune_records.py (--num-cores 1 --retune), time it...
    python scripts/ship_records.py --mcpu x86-64-v4 --num-cores 1 DIR [DIR ...]

``--seed DIR`` writes the records a build for that level and core count reads today. After a search
from them, a record of DIR whose schedule differs from the seed's is one the search found: only
those go into the shipped folder for that core count (``<level>/1-core/`` for one core, ``<level>/``
for more), added or replacing that folder's own; every other shipped record stays as it is. So the
shipped folders change by what was found, and never by a seed's record put back over a newer one,
as long as the package has not changed since the seed was written: the comparison is with the
records the package holds when shipping. Ship the folders searched from one seed in one call; a
folder shipped after another changed the package would put its copies of the seed's records back
over what the other shipped (seed again, or ship each folder's own model only, as exported by
``tuning.export_subset``).

Time the searched folder beside the shipped records before and after (``scripts/bench_layouts.py``
with ``--records``), and run ``tests/archive/test_records.py``: what ships is what builds take.

``--coverage`` says what ships: for each level and core count, each model and batch size, the layout a
build from stored records takes (``--layout auto``) and how many of its tasks have a record (a task
without one keeps TVM's default schedule, tens of times slower):

    python scripts/ship_records.py --coverage [efficientnet:1 squeezenet:8 ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import onnx

from fastinfer.archive import shipped, tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_records import model_path, model_spec, relax_module

MODELS = [(name, batch) for name in ("efficientnet", "squeezenet", "resnet50") for batch in (1, 8)]


def coverage(models: list[tuple[str, int]], cache_dir: str) -> None:
    """Print, as a markdown table, what a build from the shipped records takes for each level, core
    count (one, or several: the all-core records), model and batch size."""
    import tvm

    graphs = {(name, batch): onnx.load(model_path(name, cache_dir)) for name, batch in models}
    print("| level | cores | model | batch | layout | tasks with records |")
    print("| --- | --- | --- | ---: | --- | ---: |", flush=True)
    for level in sorted(folder.name for folder in shipped.SHIPPED_RECORDS.iterdir() if folder.is_dir()):
        for cores in (1, 2):  # any count above 1 reads the same folders as 2
            target = {"kind": "llvm", "mcpu": level, "num-cores": cores}
            tvm_target = tvm.target.Target(target)
            with tempfile.TemporaryDirectory() as records:
                shipped.unpack(shipped.folders_for(target), Path(records))
                database = tuning.load_database(Path(records))
                for (name, batch), model in graphs.items():
                    mod = relax_module(model, batch, target)
                    prepared, layout = tuning.pre_tuning_covered(mod, tvm_target, database, sys.stderr)
                    tasks, missing = tuning.record_coverage(prepared, tvm_target, database)
                    cells = (
                        level,
                        "1" if cores == 1 else "all",
                        name,
                        batch,
                        layout.upper(),
                        f"{tasks - missing} of {tasks}",
                    )
                    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("searched", nargs="*", type=Path, help="folders tune_records.py searched")
    parser.add_argument("--mcpu", default="x86-64-v4")
    parser.add_argument("--num-cores", type=int, help="1, or the core count of all-core records")
    parser.add_argument("--seed", type=Path, help="write the records builds read today into this folder, and stop")
    parser.add_argument(
        "--coverage",
        nargs="*",
        type=model_spec,
        metavar="NAME:BATCH",
        help="say what ships (default: the three models at 1 and 8)",
    )
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "fastinfer-tune-cache"))
    args = parser.parse_args()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    if args.coverage is not None:
        coverage(args.coverage or MODELS, args.cache_dir)
        return
    if args.num_cores is None:
        parser.error("--num-cores is required to seed or ship")
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
