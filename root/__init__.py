"""The root service: trims each fan-out payload to the target model's allowlist and sends it upstream.

Never imports torch (tests check it). Entry point: `trimmer root --config configs/root.yaml`.
"""
