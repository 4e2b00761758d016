"""Tools behind the ``syncstep`` command and the GPU check: not part of the training path."""
