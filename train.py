"""Train one stage of the unCLIP stack: `python train.py stage=clip|prior|decoder|upsampler [key=value ...]`."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from dalle_lightning.sweeps import objective
    from dalle_lightning.train import train  # imported here so `--help`/`--cfg` stay fast

    with report_user_errors():
        metrics = train(cfg)
    # Hydra sweepers (Optuna) minimise or maximise the value returned here.
    return objective(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
