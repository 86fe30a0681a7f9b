"""Linearity: per output feature, is the block's computation linear (d(j) against τ, with
its noise floor)?"""
