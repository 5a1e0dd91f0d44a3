"""Item alignment (QARM issue 3): item2item pairs that teach multi-modal item vectors what users do.

Modules
-------
``user2item``  two-tower User2Item retrieval model on item IDs (also a candidate generator)
``swing``      Swing item2item scores on the training interactions
``pairs``      pair mining from both sources, union, hold-out split
"""
