"""The driver where raft, txn and storage meet: persist, then send, then apply, then advance."""
