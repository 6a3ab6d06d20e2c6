"""Generate images with the trained unCLIP stack: `python sample.py prompts='[a red circle]'` (see conf/sample.yaml)."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import report_user_errors
from dalle_lightning.export import check_exports


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        # before the imports: a wrong path is reported at once (with karlo=<folder>, the CLIP's alone)
        check_exports({"clip": cfg.exports.clip} if cfg.get("karlo") else cfg.exports, "exports.")
        from dalle_lightning.sample import sample  # imported here so `--help`/`--cfg` stay fast

        sample(cfg)


if __name__ == "__main__":
    main()
