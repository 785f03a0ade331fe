"""What every party runs on, below the roles: the optimizer and autocast (``optim``),
``torch.compile`` of blocks (``compile``), batch streams (``batches``), process settings
(``process``) and the device (``device``). Nothing here knows a role or a mode."""
