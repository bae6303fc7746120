"""``train.py``: prepare | fit | export | evaluate | table (the fmc-train image's entry point).

``fit`` flags are generated from :class:`fmc.training.config.FitConfig`, one per setting and
listed under its group in ``fit --help``, so the typed config and the command line cannot
drift apart. A flag left out keeps the ablation preset's value, then the dataclass default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from fmc.cli_help import DefaultsHelpFormatter, default_goes_unsaid, from_flags
from fmc.method import CHANNELS, DEFAULT_GLOBAL_SIZE, DW_FORMS
from fmc.tiling import TilingConfig
from fmc.training.config import ABLATIONS, FitConfig, resolve_config

log = logging.getLogger("fmc.train")

#: Extra spellings users expect, e.g. ``fit --data /data --out /runs/NAME`` in docs/containers.md.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"run_dir": ("--out",)}
DOCKER_EPILOG = """\
In the fmc-train image (data-loader workers pass batches through /dev/shm, which Docker
limits to 64 MB: give the container --ipc=host or --shm-size, or fit falls back to
--num-workers 0 with a warning):
  docker run --gpus all --ipc=host -v DATA:/data -v RUNS:/runs fmc-train fit --data /data --out /runs/NAME
On a CPU, see docs/training.md "Training on a CPU" (GPU-sized defaults take minutes per step).
"""


def _add_fit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per FitConfig setting, under its group; defaults are None so only given flags win."""
    defaults = FitConfig()
    preset_flags = {name for values in ABLATIONS.values() for name in values}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for flag in FitConfig.flags():
        if flag.group not in sections:
            sections[flag.group] = parser.add_argument_group(
                f"{flag.group} settings", FitConfig.group_description(flag.group)
            )
        section = sections[flag.group]
        spellings = ("--" + flag.name.replace("_", "-"), *FLAG_ALIASES.get(flag.name, ()))
        default = defaults.value(flag)
        preset_note = " [set by --ablation]" if flag.name in preset_flags else ""
        described = flag.field.metadata["help"]
        shown = "" if default_goes_unsaid(default, described) else f" (default: {default})"
        help_text = f"{described}{shown}{preset_note}"
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": flag.name}
        if flag.choices is not None:  # the knob's, else the field's Literal values
            kwargs["choices"] = flag.choices
        if flag.hint is bool:
            section.add_argument(*spellings, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            item = int if flag.name in ("sim_shape", "val_studies") else str
            nargs = 3 if flag.name == "sim_shape" else "*"
            section.add_argument(*spellings, type=item, nargs=nargs, **kwargs)
        else:
            section.add_argument(*spellings, type=_value_type(flag.hint, default), **kwargs)


def _value_type(hint: Any, default: Any) -> type:
    """The type a flag's text is read as: the default's, else the hint's besides None (``int | None``:
    int), else str (a Literal's values are strings)."""
    if default is not None:
        return type(default)
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return kinds[0] if len(kinds) == 1 and isinstance(kinds[0], type) else str


def _fit_config(args: argparse.Namespace) -> FitConfig:
    flags = [flag.name for flag in FitConfig.flags()]
    explicit = {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}
    return resolve_config(explicit, explicit.get("ablation"))


def _wrapped(text: str) -> str:
    """A description pre-wrapped for RawDescriptionHelpFormatter (which keeps the epilog's command intact)."""
    return textwrap.fill(text, width=90)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=_wrapped(
            "Train the two-step RUNet fusion model (FuseMyCells): prepare a cache from image pairs, fit with "
            "Lightning (one GPU, many GPUs or CPU), export safetensors weights for inference.py, evaluate "
            "them against the baselines (identity, Gaussian, tuned Gaussian, resampling) and make the "
            "quality table."
        ),
        epilog=DOCKER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    parser.add_argument("--log-level", default="INFO", choices=levels, help="logging level")
    # Also accepted after the subcommand (train.py fit ... --log-level WARNING).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="logging level")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = DefaultsHelpFormatter

    prep = sub.add_parser(
        "prepare",
        parents=[common],
        help="pair, resample (0.6 um + global) and normalize training files into a cache",
        description=(
            "Find image_{N}_{channel}_{angle|fused}.tif pairs in --data, report unpaired and bad files, "
            "resample both to 0.6 um isotropic and to --global-size^3, percentile-normalize and store "
            "float16 .npy arrays plus manifest.json in --cache. Resumable: finished cases are skipped."
        ),
        formatter_class=fmt,
    )
    prep.add_argument("--data", type=Path, required=True, help="folder of image pairs")
    prep.add_argument("--cache", type=Path, required=True, help="cache folder (created)")
    prep.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    prep.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to resample")
    prep.add_argument(
        "--global-size", type=int, default=DEFAULT_GLOBAL_SIZE, help="edge of the step-1 global volume"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")

    fit = sub.add_parser(
        "fit",
        parents=[common],
        help="train step 1, step 2 or both (Lightning; DDP with --devices/--num-nodes)",
        description=_wrapped(
            "Train the two-step model. Step 1: RUNet on global volumes; step 2: RUNet on random crops of "
            "[input, step-1 output]. Loss alpha*MAE + beta*adversarial (+ optional SSIM/Pearson/cosine), "
            "difference weighting before the loss. Validation runs the real inference pipeline and keeps the "
            "checkpoint with the best mean N_SSIM. Data: --cache (prepared), --data (prepared first) or "
            "--simulate N."
        ),
        epilog=DOCKER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fit_flags(fit)
    fit.add_argument("--prepare-workers", type=int, default=1, help="worker processes when preparing --data")
    fit.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")

    exp = sub.add_parser(
        "export",
        parents=[common],
        help="write safetensors + model cards from a checkpoint",
        description=(
            "Write <out>/<channel>/[study_<N>/]step{1,2}.{safetensors,json} from a checkpoint (or a run "
            "folder: its best stage-2, else stage-1 checkpoint). inference.py and fmc.weights load these."
        ),
        formatter_class=fmt,
    )
    exp.add_argument("--ckpt", type=Path, required=True, help="checkpoint file or run folder")
    exp.add_argument(
        "--out", type=Path, required=True, help="weights root (e.g. model/ or resources/weights)"
    )
    exp.add_argument(
        "--channel", choices=("any", "nucleus", "membrane"), default="any", help="channel folder"
    )
    exp.add_argument("--study", type=int, default=None, help="also nest under study_<N>/")
    exp.add_argument(
        "--metrics-csv", type=Path, default=None, help="evaluate's summary.csv to put in the card"
    )

    ev = sub.add_parser(
        "evaluate",
        parents=[common],
        help="N_SSIM of exported weights vs the baselines (identity, gaussian, gaussian-tuned, resample)",
        description=(
            "Run the inference pipeline with --weights on the pairs of --data and score N_SSIM (fmc.metrics) "
            "beside the baselines of fmc.baselines: identity, the public Gaussian, the Gaussian with the "
            "sigma tuned on training pairs (from the cards), and the pipeline's own resampling. Mean and "
            "worst case per channel. Writes cases.csv, summary.csv and summary.md."
        ),
        formatter_class=fmt,
    )
    ev.add_argument("--weights", type=Path, required=True, help="weights root (as inference.py --weights)")
    ev.add_argument("--data", type=Path, required=True, help="folder of image pairs")
    ev.add_argument("--split", choices=("all", "train", "val"), default="all", help="which cases")
    ev.add_argument("--run", type=Path, default=None, help="run folder whose split.csv selects --split")
    ev.add_argument("--split-csv", type=Path, default=None, help="split.csv (instead of --run)")
    ev.add_argument("--out", type=Path, default=Path("evaluation"), help="folder for the tables")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    ev.add_argument("--channels", nargs="*", choices=CHANNELS, default=(), help="only these channels")
    ev.add_argument("--max-cases", type=int, default=0, help="at most this many cases (0: all)")
    tiling = TilingConfig()  # the tiling flags' defaults, as inference.py's
    ev.add_argument("--overlap", type=float, default=tiling.overlap, help="patch overlap")
    ev.add_argument("--batch", type=int, default=tiling.batch, help="patches per forward")
    ev.add_argument("--tta", action="store_true", help="test-time flips")
    ev.add_argument(
        "--dw", choices=DW_FORMS, default=None, help="DW form instead of the card's: paper | released | none"
    )
    ev.add_argument("--no-step2", action="store_true", help="step 1 alone (the step-1 rows of the table)")

    table = sub.add_parser(
        "table",
        parents=[common],
        help="the quality table (the model card's): baselines and model variants per channel and family",
        description=(
            "Score the baselines (identity, gaussian, gaussian-tuned, resample) and the model's variants "
            "(step 1, two steps, each DW form, the safeguard and the native detail on and off) on one or "
            "more folders of pairs, e.g. each regime's training and held-out families. Writes cases.csv "
            "and table.md: mean (worst case) N_SSIM, and SSIM(input, fused) per column."
        ),
        formatter_class=fmt,
    )
    table.add_argument("--weights", type=Path, required=True, help="weights root (as inference.py --weights)")
    table.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FAMILY=DIR",
        help="folders of pairs, each named by its family",
    )
    table.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="LABEL=WEIGHTS",
        help="more weights roots (other training runs): their two-step rows, named 'LABEL: ...'",
    )
    table.add_argument(
        "--preview",
        nargs="*",
        default=[],
        metavar="CASE",
        help="case ids (e.g. image_3_nucleus) to draw as labelled MIPs: input | each two-step row | target",
    )
    table.add_argument("--out", type=Path, default=Path("quality"), help="folder for cases.csv and table.md")
    table.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    table.add_argument("--overlap", type=float, default=tiling.overlap, help="patch overlap")
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    from fmc.training.cache import PrepareConfig, prepare_cache

    manifest = prepare_cache(
        PrepareConfig(
            data=args.data,
            cache=args.cache,
            workers=args.workers,
            device=args.device,
            global_size=args.global_size,
            progress=not args.no_progress,
        )
    )
    print(f"prepared {len(manifest.cases)} case(s) into {args.cache}")
    for item in manifest.failed:
        print(f"FAILED {item['case']}: {Path(item['file']).name}: {item['reason']}")
    for item in manifest.unpaired:
        print(f"UNPAIRED {Path(item['file']).name}: {item['reason']}")
    return 0 if manifest.cases else 1


def one_logging_path() -> None:
    """Lightning's lines through the root handler :func:`main` installs, and nowhere else.

    Why: importing ``lightning`` adds its own ``INFO: ...`` console handler to the ``lightning``
    logger while still propagating to the root, so the model summary and every other Lightning
    line printed twice, once bare and once in fmc's format. Call it after lightning is imported.
    """
    if not logging.getLogger().handlers:
        return  # nobody configured logging: Lightning's own console is the only path, keep it
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def cmd_fit(args: argparse.Namespace) -> int:
    config = _fit_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    from fmc.training.fit import run_fit

    one_logging_path()
    results = run_fit(config, prepare_workers=args.prepare_workers)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        for r in results:
            score = "n/a" if r.best_score is None else f"{r.best_score:.4f}"
            rate = r.throughput.get("samples_per_s")
            speed = "n/a" if rate is None else f"{rate:.2f}"
            print(
                f"stage {r.stage}: {r.global_step} steps, {speed} samples/s, best val/n_ssim {score}, "
                f"best {r.best_checkpoint or '-'}, last {r.last_checkpoint or '-'}"
            )
        print(f"export with: python train.py export --ckpt {config.data.run_dir} --out model/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fmc.training.export import export_checkpoint, read_metrics_csv

    metrics = read_metrics_csv(args.metrics_csv) if args.metrics_csv else None
    stems = export_checkpoint(args.ckpt, args.out, args.channel, args.study, metrics)
    for stem in stems:
        print(f"wrote {stem}.safetensors and {stem}.json")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fmc.training.evaluate import EvaluateConfig, evaluate, markdown_table

    split_csv = args.split_csv or (args.run / "split.csv" if args.run else None)
    _, summary = evaluate(
        from_flags(
            EvaluateConfig,
            args,
            split_csv=split_csv,
            subset=args.split,
            channels=tuple(args.channels),
            step2=not args.no_step2,
        )
    )
    print(markdown_table(summary), end="")
    print(f"tables in {args.out}")
    return 0


def _labelled(items: list[str], flag: str, example: str) -> list[tuple[str, str]]:
    """``LABEL=PATH`` arguments as pairs; a missing label is a usage error naming the flag."""
    pairs = []
    for item in items:
        label, _, path = item.rpartition("=")
        if not label:
            raise SystemExit(f"{flag} {item}: give LABEL=DIR, e.g. {example}")
        pairs.append((label, path))
    return pairs


def cmd_table(args: argparse.Namespace) -> int:
    from fmc.device import select_device
    from fmc.training.quality_table import score_family, write

    device = select_device(args.device)
    extra = {label: Path(root) for label, root in _labelled(args.extra, "--extra", "gan=runs/gan/weights")}
    rows = []
    for family, folder in _labelled(args.data, "--data", "held-out=runs/heldout"):
        rows += score_family(
            args.weights,
            Path(folder),
            family,
            device,
            args.overlap,
            extra,
            {case: args.out / f"preview_{family}_{case}.png" for case in args.preview},
        )
    print(write(args.out, rows), end="")
    print(f"tables in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    commands = {
        "prepare": cmd_prepare,
        "fit": cmd_fit,
        "export": cmd_export,
        "evaluate": cmd_evaluate,
        "table": cmd_table,
    }
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
