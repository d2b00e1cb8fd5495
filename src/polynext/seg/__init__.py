"""Semantic segmentation: UperNet on ADE20K with any polynext backbone."""
