"""Everything the weekly run trains: the signal ensemble (``signal``), the position, SL/TP and risk models, their
persistence with a verified manifest (``manifest``) and the predictor the backtester and the bot use (``bundle``).

Submodules are imported explicitly (``from ml.models.signal import ...``): importing this package stays cheap and
pulls in no ML library, so scripts that only check prerequisites start fast.
"""
