from vpt_dml.losses.proxy_anchor import ProxyAnchorLoss
from vpt_dml.losses.proxy_nca import ProxyNCALoss

__all__ = ["ProxyAnchorLoss", "ProxyNCALoss"]
