"""Machine-learning side of the weekly optimizer: config, data, features, labels, splits, models, tuning."""
