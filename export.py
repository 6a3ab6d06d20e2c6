"""Write the trained stages as a folder diffusers runs: `python export.py format=diffusers out=<folder>`."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import UserError, report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        from dalle_lightning.export_diffusers import FORMATS, export_diffusers  # here so `--help` stays fast

        if cfg.format not in FORMATS:
            raise UserError(f"format='{cfg.format}' is unknown: use one of {', '.join(FORMATS)}")
        stages = cfg.exports
        layout = export_diffusers(cfg.out, stages.clip, stages.prior, stages.get("decoder"), stages.get("upsampler"))
        print(f"wrote a {layout} folder to {cfg.out}")


if __name__ == "__main__":
    main()
