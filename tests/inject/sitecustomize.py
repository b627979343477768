"""Faults for the integration tests, injected into real trainer processes: tests put this folder on
PYTHONPATH and describe the fault in RESTORER_TEST_FAULT (JSON). Python imports sitecustomize at start;
only the process whose RANK matches (torchrun sets it before starting a rank; a plain process is rank 0)
is changed; "rank": "any" changes each rank started with this environment (one agent's, of several).

    {"rank": 1, "raise_in": "validate"}              restorer.train.loop.validate raises (a rank with or without
                                                     validation images of its own: it fails either way)
    {"rank": 1, "set": {"train.out_dir": "/x"}}      that rank's config differs (it sees another disk)
    {"rank": 0, "slow_hash_s": 4}                    that rank's disk is slow: each shard's sha256 takes 4 s more
    {"hide": "wandb"}                                the package is not installed (its import fails)
    {"rank": 0, "hold_after_step": 6}                that rank stops after step 6 until a stop signal reaches
                                                     it (SIGTERM, SIGUSR1, Ctrl-C): a run that cannot end
                                                     before the test has signalled it, however slow the machine (a
                                                     SLURM job: its first start only; a requeued one goes on)
    {"rank": 0, "hold_after_step": 6, "until_file": F}   ... or until the file F exists (the test made its change)
    {"rank": 0, "signal_after_steps": [3, 7]}        that rank sends itself SIGTERM after each of those steps
                                                     that it trains (not one a resumed run starts past)
"""

import json
import os

fault = json.loads(os.environ.get("RESTORER_TEST_FAULT") or "null")
if fault and fault.get("hide"):
    import sys

    sys.modules[fault["hide"]] = None  # `import wandb` raises ImportError; find_spec finds nothing
if fault and str(fault.get("rank", 0)) in (os.environ.get("RANK", "0"), "any"):
    if fault.get("raise_in") == "validate":
        import restorer.train.loop as train

        def validate(*args, **kwargs):
            raise RuntimeError("injected failure in validation")

        train.validate = validate
    if fault.get("slow_hash_s"):
        import time

        import restorer.data.manifest as manifest

        sha256_file = manifest.sha256_file

        def slow(path):
            time.sleep(fault["slow_hash_s"])  # a slow shared file system, not a wait for another process
            return sha256_file(path)

        manifest.sha256_file = slow
    if fault.get("hold_after_step") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":  # a requeued job goes on
        import time

        import restorer.train.loop as train

        step = train.Trainer.step

        def held(self, batches):
            step(self, batches)
            if self.state.step == fault["hold_after_step"]:
                print(f"test fault: holding after step {self.state.step} until a stop signal", flush=True)
                until = fault.get("until_file")
                while not self.stop.requested and not (until and os.path.exists(until)):
                    time.sleep(0.05)  # woken by the signal: its handler runs between two sleeps

        train.Trainer.step = held
    if fault.get("signal_after_steps"):
        import signal

        import restorer.train.loop as train

        step_once = train.Trainer.step

        def signalling(self, batches):
            step_once(self, batches)
            if self.state.step in fault["signal_after_steps"]:
                os.kill(os.getpid(), signal.SIGTERM)

        train.Trainer.step = signalling
    if fault.get("set"):
        import restorer.formats.config as config

        load_config = config.load_config

        def patched(path, overrides=()):
            return load_config(path, [*overrides, *(f"{k}={v}" for k, v in fault["set"].items())])

        config.load_config = patched
