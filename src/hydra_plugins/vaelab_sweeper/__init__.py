"""vaelab's Hydra sweeper (`hydra/sweeper: vaelab`, conf/train.yaml's default): see checked_sweeper."""
