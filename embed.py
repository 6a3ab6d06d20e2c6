"""Embed image-caption shards with a frozen CLIP: `python embed.py "shards='...{00000..00099}.tar'" output_dir=...`."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import report_user_errors
from dalle_lightning.export import locate_clip


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        if cfg.get("clip"):
            locate_clip(cfg.clip, "clip")  # before the imports: a wrong path is reported at once
        from dalle_lightning.embed import embed  # imported here so `--help`/`--cfg` stay fast

        embed(cfg)


if __name__ == "__main__":
    main()
