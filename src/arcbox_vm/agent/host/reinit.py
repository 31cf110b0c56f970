"""REINIT from the host side: give a guest restored from a snapshot its own clock,
entropy, hostname and address (the guest's half is agent/guest/reinit.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.connection import AgentConnection
from arcbox_vm.errors import AgentError


def supports_reinit(agent: AgentConnection) -> bool:
    return p.FEATURE_REINIT in (agent.hello.get("features") or [])


def send_reinit(agent: AgentConnection, body: dict[str, Any]) -> asyncio.Future[p.Frame]:
    """Queue REINIT now, ahead of any frame sent after this call; the future resolves with
    the REINIT_DONE frame."""
    if not supports_reinit(agent):
        raise AgentError("the guest agent of this snapshot is too old to be restored (no REINIT); rebuild the image "
                         "(`arcbox-vm image build`) and checkpoint again", code="unsupported")
    done = agent.expect(p.MsgType.REINIT_DONE)
    agent.send_frame_nowait(p.encode_json(p.MsgType.REINIT, 0, body))
    return done


async def reinit(agent: AgentConnection, body: dict[str, Any], timeout: float = 30.0) -> list[str]:
    """REINIT and wait for its answer; returns the guest's errors ([] = all applied)."""
    done = send_reinit(agent, body)
    try:
        frame = await asyncio.wait_for(asyncio.shield(done), timeout)
    except asyncio.TimeoutError:
        raise AgentError(f"the guest agent did not answer REINIT within {timeout:.0f} s") from None
    try:
        errors = frame.json().get("errors")
    except p.ProtocolError:
        errors = None
    return [str(e) for e in errors] if isinstance(errors, list) else ["malformed REINIT_DONE"]
