lifeboat-tag 1 9e4134e1f40ea5b55c0d5abe7254dbaa3160c225f79cff6add09e0285d593d5f
{
  "vm": "vm1",
  "disk": "data",
  "seq": 1853070350745600003,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600003,
  "time": 1767225720000,
  "consistency": "app",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "164b9cc39970bdc76e9cf471a82fcb6d7cf03639328f3e365a64bf2d2a3598e1"
  }
}