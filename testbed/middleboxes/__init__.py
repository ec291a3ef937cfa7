"""Middlebox plugins: one module per kind, registered in ``MIDDLEBOXES``.

A playbook entry ``middleboxes: [{kind: nat, path: cell, ...params}]`` is validated by the
kind's ``validate`` and, at run time, installed in the path's middlebox slot node
(``topology.middlebox_slots``) after the network is up and before recording starts.
"""

from __future__ import annotations

from testbed.middleboxes.base import Middlebox
from testbed.middleboxes.blackhole import Blackhole
from testbed.middleboxes.drop_mptcp_syn import DropMptcpSyn
from testbed.middleboxes.nat import Nat
from testbed.middleboxes.payload_rewrite import PayloadRewrite
from testbed.middleboxes.proxy import MptcpProxy, TcpProxy
from testbed.middleboxes.resegment import Resegment
from testbed.middleboxes.strip_after import StripMptcpAfter
from testbed.middleboxes.strip_mp_capable import StripMpCapable
from testbed.model.params import ParamSpec

MIDDLEBOXES: dict[str, type[Middlebox]] = {
    cls.kind: cls for cls in (Nat, StripMpCapable, DropMptcpSyn, Blackhole, Resegment,
                              TcpProxy, MptcpProxy, PayloadRewrite, StripMptcpAfter)}

__all__ = ["MIDDLEBOXES", "Middlebox", "ParamSpec"]
