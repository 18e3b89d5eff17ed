"""Training-side code for the MS-SSM classifier; needs the `train` extra (torch, wfdb, pandas)."""
