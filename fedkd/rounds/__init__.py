"""The round loop's side work, as hooks: the privacy ledger, the audit's capture, the metrics
rows and the checkpoints. No Flower types: the ServerApp's round loop calls them."""
