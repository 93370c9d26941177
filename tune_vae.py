"""
Hyperparameter sweeps of run_vae.py with Ray Tune: OptunaSearch (seeded TPE) proposes trials, ASHA stops poor ones early.

    python tune_vae.py --config config/tune_demo.yaml                       # built-in demo data, local Ray
    python tune_vae.py --config config/tune_apples.yaml tune.num_samples=40 train.epochs=8
    python tune_vae.py --config config/tune_apples.yaml --resume            # continue an interrupted sweep
    python tune_vae.py --config config/tune_apples.yaml --address auto      # join a cluster from `ray start --head`

The YAML has a `tune:` section (TUNE_DEFAULTS below), a `search_space:` of `section.key: {distribution: args}`
and, optionally, training sections (run/data/model/train/fid/wandb) that override `tune.base_config` for every
trial. Trailing `section.key=value` arguments work as in run_vae.py: `tune.*` keys change the sweep, all other
keys change the base training config. Each trial calls run_vae.train() in its own folder under
<tune.storage_path>/<tune.name>/; at the end the trials are ranked (printed and trials.csv), the best trial's
config is written as best_<name>.yaml next to the sweep YAML and its checkpoint is copied to best_models/.
"""
import argparse
import atexit
import copy
import csv
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

import run_vae
from run_vae import DEFAULTS, ConfigError

# ----------------------------------------------------------------------------------------------------
# sweep config

TUNE_DEFAULTS = {
    "name": "sweep",              # results in <storage_path>/<name>/; best config best_<name>.yaml beside the sweep YAML
    "base_config": "",            # run_vae.py training YAML every trial starts from ("" = run_vae.DEFAULTS)
    "storage_path": "logs/tune",  # made absolute; on a multi-node cluster a folder every node mounts at this path
    "num_samples": 20,            # number of trials
    "metric": "auto",             # auto (fid when fid.enabled, else val_neg_elbo) | fid | val_neg_elbo
    "mode": "min",                # both metrics are lower-is-better
    "max_concurrent_trials": 1,   # 0 = as many as the resources allow; fewer at once = better informed TPE
    "cpus_per_trial": 1.0,        # also torch's thread count in the trial
    "gpus_per_trial": 0.0,        # fractions share a GPU: 0.5 = two trials per GPU
    "seed": 0,                    # seeds Optuna's TPE sampler
    "points_to_evaluate": [],     # [{section.key: value for every search key}] tried before TPE proposes any
    "scheduler": {
        "type": "asha",           # asha (stop poor trials early) | fifo (every trial trains all train.epochs)
        "grace_period": 1,        # epochs every trial gets before ASHA may stop it
        "reduction_factor": 2,    # at each ASHA rung only the best 1/reduction_factor continue
    },
}

DISTRIBUTIONS = {  # name in the YAML -> what its argument is
    "loguniform": "[low, high], float keys, low > 0",
    "uniform": "[low, high], float keys",
    "int": "[low, high], int keys, both ends included",
    "choice": "[value, ...], any key",
}

# keys the sweep sets itself, with the reason it does
FIXED_BY_SWEEP = {
    "run.name": "each trial is named after its trial id",
    "run.log_dir": "each trial writes into its own trial folder",
    "run.best_dir": "each trial keeps its best checkpoint in its trial folder",
    "run.mode": "trials train",
    "train.epochs": "ASHA decides how long a trial trains; train.epochs is the maximum (set it in the base config)",
    "fid.enabled": "it decides the sweep's metric; set it in the base config",
}

SECTIONS = ("tune", "search_space", *DEFAULTS)


def merge_settings(settings, defaults, updates, source, prefix="tune"):
    """settings <- updates ({key: value}, or 'scheduler.grace_period' style keys from the command line)."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping of keys, got {updates!r}")
    for key, value in updates.items():
        head, _, rest = str(key).partition(".")
        where = f"{prefix}.{head}"
        if head not in defaults:
            raise ConfigError(f"{source}: unknown key '{where}'.{run_vae.suggest(head, defaults)} "
                              f"Valid keys in '{prefix}': {', '.join(defaults)}")
        if isinstance(defaults[head], dict):
            merge_settings(settings[head], defaults[head], {rest: value} if rest else value, source, where)
        elif rest:
            raise ConfigError(f"{source}: unknown key '{where}.{rest}' ('{where}' is not a section)")
        else:
            # run_vae's own type rules, so `tune.*` keys behave exactly like training keys
            settings[head] = run_vae.coerce_value(value, defaults[head], f"{source}: {where}")
    return settings


def set_trial_value(cfg, key, value, where):
    """cfg with key=value checked by run_vae's rules; returns (cfg, the value as run_vae stores it)."""
    section, _, name = key.partition(".")
    if hasattr(value, "item"):  # numpy scalars from a sampler are plain numbers to run_vae
        value = value.item()
    try:
        cfg = run_vae.merge_config(cfg, {section: {name: value}}, where)
        run_vae.check_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {key}={value!r}: {e}") from None
    return cfg, cfg[section][name]


def check_search_space(space, base, source):
    """The YAML search space as {section.key: {distribution: [checked values]}}; every value a valid config."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: 'search_space' must map section.key to a distribution, e.g. "
                          f"train.lr: {{loguniform: [1.0e-4, 3.0e-3]}}")
    checked = {}
    for key, spec in space.items():
        where = f"{source}: search_space"
        section, _, name = str(key).partition(".")
        if section not in DEFAULTS or name not in DEFAULTS[section]:
            valid = [f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s]]
            raise ConfigError(f"{where}: unknown key '{key}'.{run_vae.suggest(str(key), valid)} "
                              f"Any section.key of run_vae.DEFAULTS can be searched.")
        if key in FIXED_BY_SWEEP:
            raise ConfigError(f"{where}: '{key}' cannot be searched: {FIXED_BY_SWEEP[key]}")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: '{key}' must be one distribution, e.g. {{loguniform: [1.0e-4, 3.0e-3]}} "
                              f"or {{choice: [64, 128]}}; got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: '{key}': unknown distribution '{kind}'.{run_vae.suggest(str(kind), DISTRIBUTIONS)} "
                              f"Valid: " + "; ".join(f"{k} {v}" for k, v in DISTRIBUTIONS.items()))
        default = DEFAULTS[section][name]
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: '{key}': choice needs a non-empty list, got {args!r}")
        else:
            if not isinstance(args, list) or len(args) != 2:
                raise ConfigError(f"{where}: '{key}': {kind} needs [low, high], got {args!r}")
            wanted = int if kind == "int" else float
            if isinstance(default, bool) or type(default) is not wanted:
                hint = "int or choice" if isinstance(default, int) and not isinstance(default, bool) else "choice"
                raise ConfigError(f"{where}: '{key}' is {type(default).__name__} (like {default!r}); "
                                  f"{kind} is for {wanted.__name__} keys. Use {hint}.")
        values = [set_trial_value(base, key, v, where)[1] for v in args]
        if kind != "choice":
            low, high = values
            if not (low < high if kind != "int" else low <= high):
                raise ConfigError(f"{where}: '{key}': {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: '{key}': loguniform needs low > 0, got {args!r}")
        checked[key] = {kind: values}
    return checked


def check_points(points, space, base, source):
    """points_to_evaluate: each a {section.key: value} inside the search space (Optuna can't enqueue others)."""
    if not isinstance(points, list):
        raise ConfigError(f"{source}: tune.points_to_evaluate must be a list of {{section.key: value}} mappings")
    checked = []
    for i, point in enumerate(points):
        where = f"{source}: tune.points_to_evaluate[{i}]"
        if not isinstance(point, dict):
            raise ConfigError(f"{where} must be a mapping like {{train.lr: 1.0e-3}}, got {point!r}")
        out = {}
        for key, value in point.items():
            if key not in space:
                raise ConfigError(f"{where}: '{key}' is not in search_space.{run_vae.suggest(str(key), space)}")
            (kind, args), = space[key].items()
            _, value = set_trial_value(base, key, value, where)
            inside = value in args if kind == "choice" else args[0] <= value <= args[1]
            if not inside:
                raise ConfigError(f"{where}: {key}={value!r} is outside its search space {kind} {args}")
            out[key] = value
        missing = [k for k in space if k not in out]
        if missing:
            raise ConfigError(f"{where} must give every search_space key; missing {', '.join(missing)}")
        checked.append(out)
    return checked


def resolve_metric(settings, base, source):
    """The metric run_vae keeps the best checkpoint by, which must also be the one the sweep ranks by."""
    own = "fid" if base["fid"]["enabled"] else "val_neg_elbo"
    metric = settings["metric"]
    if metric not in ("auto", "fid", "val_neg_elbo"):
        raise ConfigError(f"{source}: tune.metric must be auto, fid or val_neg_elbo, got {metric!r}")
    if metric not in ("auto", own):
        raise ConfigError(f"{source}: tune.metric={metric} but fid.enabled={base['fid']['enabled']}: run_vae keeps "
                          f"the best checkpoint by {own}, so the sweep ranks by it too. Use tune.metric=auto, or "
                          f"fid.enabled={'true' if metric == 'fid' else 'false'}.")
    if settings["mode"] != "min":
        raise ConfigError(f"{source}: tune.mode must be min ({own} is lower-is-better), got {settings['mode']!r}")
    return own


def check_settings(s, base, source):
    if not s["name"] or any(c in s["name"] for c in "/\\"):
        raise ConfigError(f"{source}: tune.name must be a plain folder name, got {s['name']!r}")
    if "://" in s["storage_path"]:
        raise ConfigError(f"{source}: tune.storage_path must be a folder (on a cluster: one every node mounts at "
                          f"the same path), got {s['storage_path']!r}; trials write their files there directly")
    for key, low in [("num_samples", 1), ("max_concurrent_trials", 0)]:
        if s[key] < low:
            raise ConfigError(f"{source}: tune.{key} must be at least {low}, got {s[key]}")
    if s["cpus_per_trial"] <= 0 or s["gpus_per_trial"] < 0:
        raise ConfigError(f"{source}: tune.cpus_per_trial must be > 0 and tune.gpus_per_trial >= 0")
    sched = s["scheduler"]
    if sched["type"] not in ("asha", "fifo"):
        raise ConfigError(f"{source}: tune.scheduler.type must be asha or fifo, got {sched['type']!r}")
    if not 1 <= sched["grace_period"] <= base["train"]["epochs"]:
        raise ConfigError(f"{source}: tune.scheduler.grace_period must be between 1 and train.epochs "
                          f"({base['train']['epochs']}), got {sched['grace_period']}")
    if sched["reduction_factor"] < 2:
        raise ConfigError(f"{source}: tune.scheduler.reduction_factor must be at least 2, got {sched['reduction_factor']}")
    if base["run"]["mode"] != "train":
        raise ConfigError(f"{source}: the base config has run.mode={base['run']['mode']}; sweeps train (run.mode=train)")


def load_sweep(path, overrides=()):
    """TUNE_DEFAULTS <- sweep YAML <- overrides, the checked search space and the base training config."""
    path = run_vae.resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section '{section}'.{run_vae.suggest(str(section), SECTIONS)} "
                              f"Valid sections: {', '.join(SECTIONS)}")
    cli = run_vae.parse_overrides(overrides) if not isinstance(overrides, dict) else copy.deepcopy(overrides)
    if "search_space" in cli:
        raise ConfigError(f"command line: search_space can only be changed in the YAML file ({path})")
    settings = merge_settings(copy.deepcopy(TUNE_DEFAULTS), TUNE_DEFAULTS, raw.get("tune") or {}, str(path))
    settings = merge_settings(settings, TUNE_DEFAULTS, cli.pop("tune", {}), "command line")

    # training sections: the sweep YAML first, then the command line; checked one source at a time for clear errors
    training = {k: v for k, v in raw.items() if k in DEFAULTS and v is not None}
    run_vae.merge_config(DEFAULTS, training, str(path))
    run_vae.merge_config(DEFAULTS, cli, "command line")
    for section, values in cli.items():
        training.setdefault(section, {}).update(values)
    base = run_vae.load_config(settings["base_config"] or None, training)

    check_settings(settings, base, str(path))
    settings["metric"] = resolve_metric(settings, base, str(path))
    settings["storage_path"] = str(Path(settings["storage_path"]).expanduser().absolute())
    space = check_search_space(raw.get("search_space"), base, str(path))
    settings["points_to_evaluate"] = check_points(settings["points_to_evaluate"], space, base, str(path))
    if (settings["metric"] == "fid" and settings["scheduler"]["type"] == "asha"
            and settings["scheduler"]["grace_period"] < base["fid"]["every"]):
        print(f"note: the first FID is computed at epoch {base['fid']['every']} (fid.every); ASHA rungs before it "
              f"(grace_period={settings['scheduler']['grace_period']}) cannot stop trials", file=sys.stderr)
    return {"tune": settings, "search_space": space, "base": base,
            "experiment_dir": str(Path(settings["storage_path"]) / settings["name"]),
            "best_config": str(path.parent / f"best_{settings['name']}.yaml")}


def stored_sweep_path(sweep):
    return Path(sweep["experiment_dir"]) / "sweep.yaml"


def save_sweep(sweep):
    """What the trials were started with: --resume continues with exactly this, whatever the YAML says now."""
    path = stored_sweep_path(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: sweep[k] for k in ("tune", "search_space", "base")}
    path.write_text(yaml.safe_dump(stored, sort_keys=False))


def load_stored_sweep(sweep):
    """The saved sweep of an interrupted run; differences from the current YAML/overrides are reported, not used."""
    stored = yaml.safe_load(stored_sweep_path(sweep).read_text())
    # keys run_vae gained since the sweep started get their defaults
    stored["base"] = run_vae.merge_config(DEFAULTS, stored["base"], str(stored_sweep_path(sweep)))
    changed = changed_keys(stored, sweep)
    if changed:
        print(f"warning: --resume continues the sweep as saved in {stored_sweep_path(sweep)}; ignoring changes to "
              f"{', '.join(changed)}", file=sys.stderr)
    return {**stored, "experiment_dir": sweep["experiment_dir"], "best_config": sweep["best_config"]}


def changed_keys(old, new):
    changed = [f"tune.{k}" for k in TUNE_DEFAULTS if old["tune"].get(k) != new["tune"].get(k)]
    changed += [f"search_space.{k}" for k in sorted(set(old["search_space"]) | set(new["search_space"]))
                if old["search_space"].get(k) != new["search_space"].get(k)]
    changed += [f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s] if old["base"][s][k] != new["base"][s][k]]
    return changed

# ----------------------------------------------------------------------------------------------------
# Ray


def configure_ray_environment(local):
    """Environment Ray reads when it is imported or started: call before `import ray` (this file imports it lazily).

    No traffic may leave the machine in tests or CI, and none needs to for a local sweep. Checked with
    `strace -f -e trace=connect` (docs/tune.md, "No traffic leaves the machine"); the private HOME in start_ray()
    does the rest.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports to usage-stats.ray.io
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # a single-user local cluster: no token warning
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"              # trials keep our cwd; run_vae paths are absolute anyway
    if local:
        # Ray finds "its" IP by routing a UDP socket towards 8.8.8.8 and then listens on that address; this
        # switch (named for Windows/macOS, valid everywhere) makes a local Ray use 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def private_ray_home():
    """A folder with an empty ~/ray_bootstrap_config.yaml, used as HOME while Ray starts.

    Ray's dashboard process (started even with include_dashboard=False) reads ~/ray_bootstrap_config.yaml and,
    when it is missing, asks the cloud metadata servers (169.254.169.254, metadata.google.internal) which cloud
    it runs on. An empty cluster config answers that locally. It lives in a temp folder, not the user's HOME,
    because Tune treats that file in the real HOME as "this is an autoscaling cluster".
    """
    home = Path(tempfile.mkdtemp(prefix="tune_vae_ray_home_"))
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def start_ray(address=None, num_cpus=None, log_to_driver=True):
    """Join `address` (auto, host:port, ray://host:port), or start a local Ray on loopback. True if we started it."""
    configure_ray_environment(local=not address)
    import ray
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    real_home = os.path.expanduser("~")
    os.environ["HOME"] = str(private_ray_home())
    try:
        # Ray's processes inherit the private HOME; trials get the real one back (wandb, torch caches need it)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"HOME": real_home}})
    finally:
        os.environ["HOME"] = real_home
    return True

# ----------------------------------------------------------------------------------------------------
# one trial


def trial_name(trial_id):
    """Trial names and folders are trial_<id> (Tune's default folder name lists every hyperparameter)."""
    return f"trial_{trial_id}"


def trial_dirname(trial):
    return trial_name(trial.trial_id)


def trial_config(base, params, trial_dir, trial_id):
    """The base config with the trial's sampled values; run_vae writes everything into the trial folder."""
    cfg = base
    for key, value in params.items():
        cfg, _ = set_trial_value(cfg, key, value, f"trial {trial_id}")
    cfg = copy.deepcopy(cfg)
    cfg["run"].update(name=trial_id, log_dir=str(trial_dir), best_dir=str(trial_dir))
    return cfg


def link_or_copy(src, dst):
    try:
        os.link(src, dst)  # last.pt is replaced atomically, never rewritten, so a hard link is a stable snapshot
    except OSError:
        shutil.copy2(src, dst)


def run_trial(params, sweep, fid_features=None):
    """A Tune function trainable: run_vae.train() in the trial folder, one ray.tune.report per epoch.

    fid_features: passed on to run_vae.train (a small stand-in for the Inception network in tests).
    """
    import ray.tune
    import torch
    torch.set_num_threads(max(1, int(sweep["tune"]["cpus_per_trial"])))
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    # get_trial_dir() is a node-local staging folder; our files go straight to the (shared) storage path
    trial_dir = Path(sweep["experiment_dir"]) / trial_name(trial_id)
    cfg = trial_config(sweep["base"], params, trial_dir, trial_id)
    paths = run_vae.Checkpointing(cfg)

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:  # resumed by Tune: continue from the state it last recorded
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as saved:
            tmp = paths.last.with_name(".last.pt.restore")
            shutil.copy2(Path(saved) / "last.pt", tmp)
            os.replace(tmp, paths.last)
    elif paths.run_dir.exists():  # started over from scratch: the old attempt's files would stop train()
        shutil.rmtree(paths.run_dir)

    def report(epoch, metrics, run_dir):
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint_", dir=trial_dir))
        try:
            link_or_copy(paths.last, staging / "last.pt")
            ray.tune.report(dict(metrics), checkpoint=ray.tune.Checkpoint.from_directory(str(staging)))
        finally:  # Tune has copied it into checkpoint_NNNNNN by now
            shutil.rmtree(staging, ignore_errors=True)

    run_vae.train(cfg, resume=checkpoint is not None, report=report, fid_features=fid_features)

# ----------------------------------------------------------------------------------------------------
# the sweep


def report_key(sweep):
    """run_vae reports best_<metric> after every epoch: the value of the checkpoint the trial would hand over.

    With FID it is carried between FID epochs (inf before the first), so ASHA and Optuna always see the metric.
    """
    return "best_" + sweep["tune"]["metric"]


def param_space(sweep):
    from ray import tune
    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "int": lambda a: tune.randint(a[0], a[1] + 1), "choice": tune.choice}
    return {key: make[kind](args) for key, spec in sweep["search_space"].items() for kind, args in spec.items()}


def make_trainable(sweep, fid_features=None):
    from ray import tune
    resources = {"cpu": sweep["tune"]["cpus_per_trial"], "gpu": sweep["tune"]["gpus_per_trial"]}
    return tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, fid_features=fid_features), resources)


def make_searcher(sweep):
    from ray.tune.search.optuna import OptunaSearch
    s = sweep["tune"]
    # Optuna's default sampler is TPE; the seed makes the proposals repeatable
    return OptunaSearch(seed=s["seed"], points_to_evaluate=copy.deepcopy(s["points_to_evaluate"]) or None)


def make_tuner(sweep, callbacks=(), fid_features=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    s, sched = sweep["tune"], sweep["tune"]["scheduler"]
    if sched["type"] == "asha":
        # time is run_vae's epoch, which survives resume (Tune's training_iteration counts reports)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep["base"]["train"]["epochs"],
                                  grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(
        metric=report_key(sweep), mode=s["mode"], search_alg=make_searcher(sweep), scheduler=scheduler,
        num_samples=s["num_samples"], max_concurrent_trials=s["max_concurrent_trials"] or None,
        reuse_actors=True,  # one process runs trial after trial: no torch import per trial
        trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname)
    run_config = tune.RunConfig(
        name=s["name"], storage_path=s["storage_path"],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # last.pt holds everything needed to resume
        failure_config=tune.FailureConfig(max_failures=0),       # a failed trial is recorded, the sweep goes on
        callbacks=list(callbacks))
    return tune.Tuner(make_trainable(sweep, fid_features), param_space=param_space(sweep), tune_config=tune_config,
                      run_config=run_config)


def sweep_exists(sweep):
    from ray import tune
    return tune.Tuner.can_restore(sweep["experiment_dir"])


def run_sweep(sweep, resume=False, callbacks=(), fid_features=None):
    """Fit a new sweep or continue a saved one; returns (ResultGrid, interrupted).

    callbacks: extra ray.tune.Callback objects for a new sweep; a resumed one keeps those it was saved with.
    fid_features: see run_trial.
    """
    from ray import tune
    if resume:
        # finished and failed trials stay as they are; unfinished ones continue from their last checkpoint
        tuner = tune.Tuner.restore(sweep["experiment_dir"], make_trainable(sweep, fid_features),
                                   resume_unfinished=True)
    else:
        save_sweep(sweep)
        tuner = make_tuner(sweep, callbacks, fid_features)
    results = tuner.fit()
    return results, count_unfinished(sweep) > 0


def count_unfinished(sweep):
    """Trials not yet finished or failed, by the state Tune saved last (missing samples count too).

    On Ctrl-C Tune saves its state and returns instead of raising; the trials it then stops look finished in
    the returned results, but the saved state still has them running, and --resume continues them.
    """
    from ray import tune
    trials = tune.ExperimentAnalysis(sweep["experiment_dir"]).trials
    finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return sweep["tune"]["num_samples"] - finished

# ----------------------------------------------------------------------------------------------------
# results


def error_summary(error):
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1].strip() if lines else ''}"[:300]


def rank_trials(results, sweep):
    """One row per trial, best first; failed trials last, with their error."""
    metric, key, epochs = sweep["tune"]["metric"], report_key(sweep), sweep["base"]["train"]["epochs"]
    rows = []
    for result in results:
        metrics = result.metrics or {}
        done = int(metrics.get("epoch", 0))
        row = {"trial": Path(result.path).name.removeprefix(trial_name("")),
               "status": "failed" if result.error else ("done" if done >= epochs else "stopped early"),
               "epochs": done, metric: float(metrics.get(key, math.inf))}
        row.update({k: result.config.get(k) for k in sweep["search_space"]})
        row.update(error=error_summary(result.error) if result.error else "", path=result.path)
        rows.append(row)
    # mode is always min (check_settings); a trial without a finite value ranks after those with one
    rows.sort(key=lambda r: (r["status"] == "failed", r[metric] if math.isfinite(r[metric]) else math.inf))
    return [{"rank": rank, **row} for rank, row in enumerate(rows, 1)]


def format_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_table(rows, file=sys.stdout, max_width=100):
    """Aligned columns; long cells (errors) are cut here, trials.csv has them whole."""
    columns = [c for c in rows[0] if c != "path"]
    cells = [[format_value(r[c])[:max_width] for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=file)
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip(), file=file)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def relative_path(path):
    """Paths inside the working folder are written relative, so a best config stays valid in a moved checkout."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def trial_train_set(cfg):
    data, train_idx, _ = run_vae.load_data(cfg)
    return data.subset(train_idx)


def save_best(rows, sweep):
    """best_<name>.yaml trains the best trial's config with run_vae.py; its checkpoint goes to best_models/."""
    metric = sweep["tune"]["metric"]
    best = next((r for r in rows if r["status"] != "failed" and math.isfinite(r[metric])), None)
    if best is None:
        return None
    name, base_run = sweep["tune"]["name"], sweep["base"]["run"]
    trial_cfg = trial_config(sweep["base"], {k: best[k] for k in sweep["search_space"]}, Path(best["path"]),
                             best["trial"])
    checkpoint = Path(base_run["best_dir"]) / f"tune_{name}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")
    shutil.copy2(run_vae.Checkpointing(trial_cfg).best, tmp)
    os.replace(tmp, checkpoint)
    # a trial stopped early (ASHA) with FID off never reached train()'s final fit of best.pt
    run_vae.refit_stale_prior(checkpoint, lambda: trial_train_set(trial_cfg))

    cfg = copy.deepcopy(trial_cfg)
    # a fresh run under the base config's folders; its own best checkpoint never overwrites the sweep's copy
    cfg["run"].update(name=f"best_{name}", log_dir=base_run["log_dir"], best_dir=base_run["best_dir"])
    for section, key in [("data", "root"), ("data", "cache_dir"), ("run", "log_dir"), ("run", "best_dir")]:
        cfg[section][key] = relative_path(cfg[section][key])
    config_path = Path(sweep["best_config"])
    searched = ", ".join(f"{k}={format_value(best[k])}" for k in sweep["search_space"])
    config_path.write_text(
        f"# Best trial of sweep '{name}' ({best['trial']}): {metric}={format_value(best[metric])} after "
        f"{best['epochs']} epochs. Written by tune_vae.py.\n"
        f"# Searched: {searched}\n"
        f"# All trials: {relative_path(Path(sweep['experiment_dir']) / 'trials.csv')}\n"
        f"# Train it again:                 python run_vae.py --config {relative_path(config_path)}\n"
        f"# Test the sweep's own checkpoint: python run_vae.py --config {relative_path(config_path)} "
        f"run.mode=test test.checkpoint={relative_path(checkpoint)}\n"
        + run_vae.config_to_yaml(cfg))
    return {"trial": best["trial"], "value": best[metric], "config": str(config_path), "checkpoint": str(checkpoint)}


def summarize(results, sweep):
    """Print and save the ranked table; write the best config and checkpoint. Returns (rows, best or None)."""
    rows = rank_trials(results, sweep)
    if not rows:
        return rows, None
    print(f"\ntrials of sweep '{sweep['tune']['name']}' ranked by {sweep['tune']['metric']} (best value per trial):")
    print_table(rows)
    csv_path = Path(sweep["experiment_dir"]) / "trials.csv"
    write_csv(rows, csv_path)
    print(f"wrote {relative_path(csv_path)}")
    best = save_best(rows, sweep)
    if best:
        print(f"best trial {best['trial']}: {sweep['tune']['metric']}={best['value']:.4g} -> "
              f"{relative_path(best['config'])}, {relative_path(best['checkpoint'])}")
    return rows, best

# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (extension optional), e.g. config/tune_apples.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep <storage_path>/<name>")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join a running Ray cluster: auto, host:6379 or ray://host:10001 (default: $RAY_ADDRESS, "
                        "else start a local Ray on this machine)")
    p.add_argument("--num_cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. tune.num_samples=10 train.epochs=5")
    return p.parse_args(argv)


def main(argv=None, callbacks=()):
    args = parse_args(argv)
    configure_ray_environment(local=not args.address)
    started = False
    try:
        sweep = load_sweep(args.config, args.overrides)
        if args.resume:
            if not sweep_exists(sweep):
                raise ConfigError(f"--resume: no sweep to continue at {sweep['experiment_dir']}")
            sweep = load_stored_sweep(sweep)
        elif sweep_exists(sweep):
            raise ConfigError(f"sweep {sweep['experiment_dir']} already exists. Continue it with --resume, "
                              f"or start a new one with tune.name=<new name>.")
        started = start_ray(args.address, args.num_cpus)
        results, interrupted = run_sweep(sweep, resume=args.resume, callbacks=callbacks)
        if interrupted:
            left = count_unfinished(sweep)
            print(f"\nsweep interrupted with {left} of {sweep['tune']['num_samples']} trials unfinished; continue "
                  f"with: python tune_vae.py --config {args.config} --resume", file=sys.stderr)
            return 130
        rows, best = summarize(results, sweep)
        if best is None:
            print("error: no trial finished with a finite metric; see the errors above and the trial folders in "
                  f"{sweep['experiment_dir']}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            import ray
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
