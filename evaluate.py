"""Evaluate the trained unCLIP stack: `python evaluate.py` (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import report_user_errors
from dalle_lightning.export import check_exports, locate_clip


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        check_exports(cfg.exports, "exports.")  # before the imports: a wrong path is reported at once
        if cfg.get("scorer_clip"):
            locate_clip(cfg.scorer_clip, "scorer_clip")
        from dalle_lightning.evaluate import evaluate  # imported here so `--help`/`--cfg` stay fast

        evaluate(cfg)


if __name__ == "__main__":
    main()
