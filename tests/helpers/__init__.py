"""What the tests share: the config they compose, data they write, processes they run, stores they read."""
