"""Embed image-caption shards with a frozen CLIP: `python embed.py "shards='...{00000..00099}.tar'" output_dir=...`."""

import hydra
from omegaconf import DictConfig

import dalle_lightning.resolvers  # noqa: F401  (registers ${dl.*} before composition)
from dalle_lightning.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    from dalle_lightning.embed import embed  # imported here so `--help`/`--cfg` stay fast

    with report_user_errors():
        embed(cfg)


if __name__ == "__main__":
    main()
