"""The trading logic (shared with the live bot) and the bar-by-bar backtester that drives it."""
