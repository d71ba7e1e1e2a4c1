//! Home of the multi-process end-to-end tests (a coordinator on :20004 with several agents, in
//! network namespaces), which arrive with the coordinator. End-to-end tests of a single agent —
//! real fsfreeze, SIGKILL, Azurite — live in `agent/tests/`, where the agent binary is built.
