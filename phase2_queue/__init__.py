"""Phase 2: tasks wait in Redis through RQ; separate worker processes run them."""
