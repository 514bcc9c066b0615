"""defectscope.benchmarks"""
