"""checkpoints_tools"""
