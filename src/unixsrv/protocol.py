"""Protocol: the base class for event-model handlers.

It is ``asyncio.Protocol`` itself, re-exported so code written for
unixsrv reads naturally; any existing ``asyncio.Protocol`` subclass works
unchanged with ``Server(config, protocol=MyProtocol)``.
"""

from asyncio import Protocol

__all__ = ["Protocol"]
