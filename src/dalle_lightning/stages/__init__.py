"""The four stages of unCLIP, one LightningModule each. A stage never imports another stage."""
