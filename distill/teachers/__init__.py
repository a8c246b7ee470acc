"""Where the teacher's outputs come from: online, partitioned across ranks, or a distill-cache cache, behind one interface."""
