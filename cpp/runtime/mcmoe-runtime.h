#pragma once

#if defined(_WIN32)
#    define MCMOE_API extern "C" __declspec(dllexport)
#else
#    define MCMOE_API extern "C" __attribute__((visibility("default")))
#endif

// "mcmoe-runtime abi=<n> source_hash=<sha256 of cpp/ and patches/> features=<a,b,...>"
MCMOE_API const char * mcmoe_runtime_info(void);
