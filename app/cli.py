"""The `downpour` command line: the application layer's entry point.

    downpour train [settings]             train: --mode single (one process, the baseline),
                                          --mode async|sync|ssp (a local cluster of processes),
                                          or --mode hogwild (local processes, no servers)
    downpour scheduler [settings]         one role each: what a docker-compose service runs
    downpour server --scheduler ADDR
    downpour worker --scheduler ADDR
    downpour bench core [--json]          one training step against PyTorch; the optimizer update
    downpour bench comm [--json]          push_pull through shard servers against raw pyzmq
                                          doing the same work, with and without CurveZMQ;
                                          sparse pull and push through servers' tables;
                                          --fill ROWS: a table grown by a stream of new keys
    downpour bench codecs [--json]        each wire codec's encode and decode against np.copyto
    downpour experiment --out DIR [...]   a sweep of runs over modes, workers, shards, links,
                                          compute scales and models: CSV and plots
                                          (--simulate: the same sweep predicted)
    downpour simulate [settings]          a run predicted by a calibrated discrete-event model
                                          (--calibrate, --explain, --validate, --json)
    downpour plot METRICS.jsonl...        accuracy curves of any runs
    downpour download mnist [--dir DIR]   fetch the four MNIST files, verifying their checksums
    downpour synth ctr DIR [--rows N]     click-through rows in the Criteo layout from a planted
                                          model, and the best logloss any model can reach
    downpour keys DIR                     the cluster's CURVE keys, one pair per role (--keys DIR)

Settings come from downpour.common.config (flags, DOWNPOUR_* variables, --config FILE).
Each command imports the role it runs only when it runs, after the BLAS thread
count is pinned, so nothing here loads NumPy before that. A user's mistake prints
one line, `downpour: error: ...`, and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from downpour import __version__
from downpour.common import config
from downpour.common.errors import DownpourError
from downpour.common.wire import address

TRAIN_GROUPS = ("run", "data", "model", "optim", "train", "output", "cluster")
ROLE_SETTINGS = {  # command -> the settings it takes
    "scheduler": TRAIN_GROUPS + ("bind", "insecure", "endpoint_file", "keys"),
    "server": ("scheduler", "bind", "advertise", "insecure", "checkpoint_dir", "resume", "threads",
               "start_timeout_s", "keys"),
    "worker": ("scheduler", "data_dir", "threads", "start_timeout_s", "keys"),
}


def _check_codecs(cfg: config.Config) -> None:
    """ConfigError for a push or pull codec that is not one (common/wire/codec.py), and
    for onebit pulls: weights are not signs."""
    from downpour.common.wire import codec
    for name in ("push_codec", "pull_codec"):
        try:
            codec.parse(getattr(cfg, name))
        except config.ConfigError as e:
            raise config.ConfigError(f"{name}={getattr(cfg, name)!r}: {e}") from None
    if codec.parse(cfg.pull_codec).name == "onebit":
        raise config.ConfigError("pull_codec='onebit': onebit sends signs, which suit gradients, "
                                 "not weights; pull with none, fp16 or topk:R")


def _pinned(args: argparse.Namespace) -> config.Config:
    """The settings of `args`, with this process's BLAS threads pinned before NumPy loads.

    A command that knows the run's mode (train, scheduler) refuses a setting given
    explicitly that the mode does not use, and makes its output paths ready first. A role
    command checks its addresses before any socket exists (`_check_addresses`).
    """
    given = config.given(args)
    cfg = config.Config(**given)
    if args.command in ROLE_SETTINGS:
        _check_addresses(cfg)
    if args.command == "scheduler" and cfg.mode not in config.CLUSTER:
        raise config.ConfigError(f"the scheduler conducts --mode {', '.join(config.CLUSTER)}, not "
                                 f"{cfg.mode!r}: give --mode (or DOWNPOUR_MODE)")
    if args.command in ("train", "scheduler"):
        config.check_used(given, cfg.mode)
        if cfg.link and given.get("transport") == "ipc":
            raise config.ConfigError("--transport ipc would bypass the links of --link (they "
                                     "shape tcp between the nodes' own addresses): drop "
                                     "--transport")
        _check_codecs(cfg)
        from downpour.common.training import check_outputs
        check_outputs(cfg)
    from downpour.common.threads import pin_blas_threads
    pin_blas_threads(cfg.threads)
    return cfg


def _check_addresses(cfg: config.Config) -> None:
    """Every address a role was given (--bind, --scheduler, --advertise; flags, DOWNPOUR_*
    or the file), read before any socket exists: a ConfigError shows the corrected form.
    Protected mode: without keys, a bind beyond this host needs --insecure.

    The default binds need no check: without keys they are loopback (ps/scheduler.py,
    ps/server.py). Inside a run's own emulated network (--link, downpour/netem.py) any
    bind is private to the run, and allowed (`address.in_private_network`).
    """
    if cfg.bind:
        where = address.parse(cfg.bind, "--bind", bind=True)
        address.check_exposure(where, "--bind", keys=bool(cfg.keys), insecure=cfg.insecure)
    if cfg.scheduler:
        address.parse(cfg.scheduler, "--scheduler", bind=False)
    if cfg.advertise:
        address.parse_host(cfg.advertise, "--advertise")


def _train(args: argparse.Namespace) -> int:
    cfg = _pinned(args)
    if cfg.mode == "single":
        from downpour.worker.single import train
        train(cfg)
        return 0
    if cfg.mode == "hogwild":
        from downpour.worker.hogwild import train
        train(cfg)
        return 0
    from downpour.common.training import check_cluster, training_samples
    from downpour.launch import launch
    check_cluster(cfg, training_samples(cfg))     # refused before any process starts
    return launch(cfg)


def _role(args: argparse.Namespace) -> int:
    cfg = _pinned(args)
    if args.command == "scheduler":
        from downpour.ps.scheduler import main
    elif args.command == "server":
        from downpour.ps.server import main
    else:
        from downpour.worker.replica import main
    return main(cfg)


def _bench(args: argparse.Namespace) -> int:
    from downpour.common.threads import pin_blas_threads
    pin_blas_threads(args.threads)
    if args.what == "core":
        from downpour.bench.core import main as bench_core
        return bench_core(args)
    if args.what == "codecs":
        from downpour.bench.codecs import main as bench_codecs
        return bench_codecs(args)
    if args.fill:
        from downpour.bench.fill import main as bench_fill
        return bench_fill(args)
    from downpour.bench.comm import main as bench_comm
    return bench_comm(args)


def _experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from downpour.experiment import parse_axes, run_sweep, simulate_sweep
    modes = config.parse_list(args.modes, "modes", str, config.FIELDS["mode"].metadata["choices"])
    workers = config.parse_list(args.workers, "workers")
    shards = config.parse_list(args.shards, "shards")
    if args.repeats < 1 or not 0 < args.target <= 1:
        raise config.ConfigError("--repeats must be >= 1 and --target in (0, 1]")
    if args.profile is not None and not args.simulate:
        raise config.ConfigError("--profile holds the simulator's costs: add --simulate, or drop "
                                 "--profile")
    settings = {k: v for k, v in vars(args).items() if k not in ("workers", "shards")}
    given = config.given(settings)          # the axes' flags (models, links, scales) are not settings
    axes = parse_axes(given, layers=args.models, link=args.links, compute_scale=args.scales,
                      push_codec=args.push_codecs, pull_codec=args.pull_codecs)
    cfg = config.Config(**{**given, "link": axes.link[0]})     # --server-link wants a link here too
    if not args.simulate:
        run_sweep(cfg, modes, workers, shards, args.repeats, Path(args.out), args.target,
                  given=given, axes=axes)
        return 0
    from downpour.common.threads import pin_blas_threads
    from downpour.sim.profile import DEFAULT_PROFILE
    pin_blas_threads(cfg.threads)              # a worker's compute is timed as workers run it
    simulate_sweep(cfg, modes, workers, shards, args.repeats, Path(args.out),
                   Path(args.profile or DEFAULT_PROFILE).expanduser(), args.target,
                   given=given, axes=axes)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from downpour.common.threads import pin_blas_threads
    own = ("calibrate", "validate", "explain", "json", "profile", "device_gflops", "repeats", "runs")
    given = config.given({k: v for k, v in vars(args).items() if k not in own})
    given.setdefault("mode", "async")          # a cluster mode; train's default is single
    cfg = config.Config(**given)
    config.check_used(given, cfg.mode)
    pin_blas_threads(cfg.threads)              # a worker's compute is timed as workers run it
    _check_codecs(cfg)
    from downpour.sim.command import main as simulate
    return simulate(args, cfg)


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from downpour import plots
    if not plots.available():
        raise config.ConfigError("plots need matplotlib: pip install -e '.[plot]'")
    print(plots.curves([Path(m) for m in args.metrics], Path(args.out)))
    return 0


def _download(args: argparse.Namespace) -> int:
    from downpour.common.data import default_data_dir
    from downpour.download import MNIST_MIRRORS, download_mnist, training_hint
    mirrors = [args.base_url] if args.base_url else list(MNIST_MIRRORS)
    dest = args.dir or str(default_data_dir())
    for path in download_mnist(dest, mirrors, timeout=args.timeout):
        print(path)
    print(training_hint(dest), file=sys.stderr)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from downpour.synth import summary, write_ctr
    truth = write_ctr(args.dir, args.rows, args.seed)
    for name in ("train.tsv", "test.tsv", "truth.json"):
        print(Path(args.dir) / name)
    print(summary(truth), file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from downpour.common.wire.security import write_keys
    written = write_keys(args.dir)
    if written:
        print("\n".join(map(str, written)))
        print(f"give every node --keys {args.dir} (DOWNPOUR_KEYS), and each only its own "
              "role's .key_secret", file=sys.stderr)
    else:
        print(f"downpour: {args.dir} already holds the cluster's keys; kept them", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="downpour", description="Distributed parameter-server "
                                  "training: sharded servers, NumPy workers, Downpour SGD.")
    top.add_argument("--version", action="version", version=f"downpour {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (settings: flags, DOWNPOUR_* or --config)")
    config.add_arguments(train, TRAIN_GROUPS + ("keys",))
    train.set_defaults(run=_train)

    for role, settings in ROLE_SETTINGS.items():
        p = sub.add_parser(role, help=f"run one {role} (settings: flags or DOWNPOUR_*)")
        config.add_arguments(p, settings)
        p.set_defaults(run=_role)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    kinds = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    core = kinds.add_parser("core", help="one training step against PyTorch; the Adam update")
    core.add_argument("--batch-sizes", default="128,512", help="batch sizes to time (default 128,512)")
    core.add_argument("--repeats", type=int, default=30, help="timed steps per case (default 30)")
    core.add_argument("--adam-size", type=int, default=16 * 2**20,
                      help="elements in the optimizer-update benchmark (default 16M)")
    core.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    comm = kinds.add_parser("comm", help="push_pull through shard servers against raw pyzmq (the "
                            "same work; a bare echo), with and without CURVE; sparse pull and push "
                            "through servers' tables against raw pyzmq")
    comm.add_argument("--shards", default="1,2,4", help="server counts (default 1,2,4)")
    comm.add_argument("--transports", default="ipc,tcp",
                      help="transports, each with rows of its own (default ipc,tcp)")
    comm.add_argument("--repeats", type=int, default=10,
                      help="timed round trips per contender and case (default 10)")
    comm.add_argument("--vectors", nargs="*", choices=["mlp", "16M", "sparse"],
                      help="which rows: the mlp or 16M vector's push_pull, sparse pull and push "
                           "(default all)")
    comm.add_argument("--sparse-keys", type=int, default=16384,
                      help="keys in one sparse pull or push (default 16384)")
    comm.add_argument("--fill", type=int, default=0, metavar="ROWS",
                      help="instead: stream ROWS new keys through one set of servers' tables "
                           "(--shards S, --transports T), printing rows and memory as they grow")
    comm.add_argument("--table-max-rows", type=int, default=0,
                      help="with --fill: each server's row cap (LRU eviction; default 0, none)")
    comm.add_argument("--embed-dim", type=int, default=16,
                      help="with --fill: rows of 1 + this many float32 (default 16)")
    comm.add_argument("--piece-kib", type=int, default=config.Config.piece_kib,
                      help=f"server piece size in KiB, as in training (default {config.Config.piece_kib}; "
                           "0 = whole shards)")
    codecs = kinds.add_parser("codecs", help="each wire codec's encode and decode of one vector "
                              "against np.copyto (one core)")
    codecs.add_argument("--n", type=int, help="float32 elements (default: the MLP 784-1024-1024-10's "
                        "parameters)")
    codecs.add_argument("--repeats", type=int, default=50,
                        help="timed calls per contender (default 50)")
    for kind in (core, comm, codecs):
        kind.add_argument("--json", action="store_true", help="print JSON instead of a table")
        kind.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    bench.set_defaults(run=_bench)

    exp = sub.add_parser("experiment", help="a sweep of runs: results.csv and PNG plots")
    exp.add_argument("--modes", default="single,sync,async,ssp,hogwild",
                     help="modes to run (default single,sync,async,ssp,hogwild)")
    exp.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    exp.add_argument("--shards", default="1", help="shard counts for cluster modes (default 1)")
    exp.add_argument("--repeats", type=int, default=1, help="runs per case, seeds seed..seed+N-1")
    exp.add_argument("--target", type=float, default=0.95,
                     help="accuracy whose time-to-reach is reported (default 0.95)")
    exp.add_argument("--layers", dest="models", metavar="MODELS", default=None,
                     help="models separated by ';', each hidden layers as `train --layers` takes "
                          "them, e.g. 'dense:64,relu;conv:8:3,relu,maxpool:2,flatten,dense:64,relu' "
                          "(default: the MLP of --hidden)")
    exp.add_argument("--link", dest="links", metavar="LINKS", default=None,
                     help="emulated link rates in tc's syntax, or none for runs without links, "
                          "e.g. none,100mbit,1gbit (default: no links)")
    exp.add_argument("--compute-scale", dest="scales", metavar="SCALES", default=None,
                     help="compute scales >= 1, each worker step padded to F x its compute, "
                          "e.g. 1,4 (default 1: no padding)")
    exp.add_argument("--push-codec", dest="push_codecs", metavar="CODECS", default=None,
                     help="push codecs, e.g. none,topk:0.01 (default none)")
    exp.add_argument("--pull-codec", dest="pull_codecs", metavar="CODECS", default=None,
                     help="pull codecs, e.g. none,fp16 (default none)")
    exp.add_argument("--out", required=True,
                     help="directory for results.csv (--simulate: simulated.csv), runs/ and plots")
    exp.add_argument("--simulate", action="store_true",
                     help="predict the cluster modes' cases with the calibrated model of "
                          "`downpour simulate` instead of running them: simulated.csv and plots")
    exp.add_argument("--profile", default=None,
                     help="--simulate: the costs measured by `downpour simulate --calibrate` "
                          "(default: its default profile, calibrated first if missing)")
    config.add_arguments(exp, TRAIN_GROUPS, exclude=("mode", "workers", "shards", "metrics", "save",
                                                     "layers", "link", "compute_scale",
                                                     "push_codec", "pull_codec"))
    exp.set_defaults(run=_experiment)

    sim = sub.add_parser("simulate", help="predict a run with a calibrated discrete-event model")
    from downpour.sim.profile import DEFAULT_PROFILE
    sim.add_argument("--calibrate", action="store_true",
                     help="measure this machine's costs into the profile (under a minute)")
    sim.add_argument("--validate", action="store_true",
                     help="run the validation grid of real emulated runs against predictions")
    sim.add_argument("--repeats", type=int, default=3, help="--validate: runs per case (default 3)")
    sim.add_argument("--runs", default="", help="--validate: keep the runs' end records in this "
                     "JSON file as they come; those it holds are not run again")
    sim.add_argument("--explain", action="store_true",
                     help="print every number the model uses, with its unit and source")
    sim.add_argument("--json", action="store_true", help="print one JSON line (end record names)")
    sim.add_argument("--profile", default=str(DEFAULT_PROFILE),
                     help=f"the costs measured by --calibrate (default {DEFAULT_PROFILE})")
    sim.add_argument("--device-gflops", type=float, default=0.0,
                     help="another machine's compute rate: a batch takes its counted FLOPs "
                          "over this many GFLOP/s (default: the profile's measured time)")
    config.add_arguments(sim, TRAIN_GROUPS + ("keys",), exclude=("metrics", "save"))
    sim.set_defaults(run=_simulate)

    plot = sub.add_parser("plot", help="accuracy curves of runs from their metrics files")
    plot.add_argument("metrics", nargs="+", help="JSON-lines metrics files (--metrics)")
    plot.add_argument("--out", default="accuracy.png", help="PNG to write (default accuracy.png)")
    plot.set_defaults(run=_plot)

    download = sub.add_parser("download", help="download a dataset, verifying checksums")
    download.add_argument("dataset", choices=["mnist"])
    download.add_argument("--dir", default="", help="destination (default: $DOWNPOUR_DATA_DIR or data/mnist)")
    download.add_argument("--base-url", default="", help="a mirror holding the four .gz files")
    download.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    download.set_defaults(run=_download)

    synth = sub.add_parser("synth", help="write a dataset drawn from a planted model")
    made = synth.add_subparsers(dest="what", required=True, metavar="WHAT")
    synth_ctr = made.add_parser("ctr", help="click-through rows in the Criteo layout: train.tsv, "
                                "test.tsv and truth.json (the planted model's own logloss)")
    synth_ctr.add_argument("dir", help="folder for the three files (created if missing)")
    synth_ctr.add_argument("--rows", type=int, default=1_000_000,
                           help="training rows; the test split gets rows // 5 (default 1000000)")
    synth_ctr.add_argument("--seed", type=int, default=0, help="the model's and the rows' seed "
                           "(default 0): the same seed writes the same files")
    synth.set_defaults(run=_synth)

    keys = sub.add_parser("keys", help="write the cluster's CURVE key pairs (kept if all there)")
    keys.add_argument("dir", help="folder for scheduler/server/worker .key and .key_secret")
    keys.set_defaults(run=_keys)
    return top


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments; an unknown flag exits 2 naming the nearest flag of its command."""
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra:
        command = top._subparsers._group_actions[0].choices[args.command]
        while getattr(args, "what", None) and command._subparsers:      # bench core|comm
            command = command._subparsers._group_actions[0].choices[args.what]
        flags = [o for a in command._actions for o in a.option_strings]
        unknown = next((e for e in extra if e.startswith("-")), extra[0]).split("=")[0]
        alias = config.ALIASES.get(unknown.lstrip("-").lower().replace("-", "_"), "")
        close = [f for f in flags if f == "--" + alias.replace("_", "-")] or \
            difflib.get_close_matches(unknown, flags, n=1)
        hint = f"did you mean {close[0]}?" if close else "see --help"
        print(f"{command.prog}: error: unrecognized argument {unknown}; {hint} "
              f"({command.prog} --help lists every flag)", file=sys.stderr)
        sys.exit(2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.run(args)
    except DownpourError as e:
        print(f"downpour: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("downpour: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
