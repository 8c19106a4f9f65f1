"""(populated below)"""
