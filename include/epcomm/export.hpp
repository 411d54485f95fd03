// SPDX-License-Identifier: Apache-2.0
// EPCOMM_API marks what the epcomm libraries export. They are compiled with hidden visibility,
// so a shared libepcomm.so exposes the public API only (classes, their type info and the free
// functions declared in include/epcomm/) and keeps its internals to itself.
#pragma once

#if defined(_WIN32)
#error "epcomm supports Linux only"
#elif defined(__GNUC__) || defined(__clang__)
#define EPCOMM_API __attribute__((visibility("default")))
#else
#define EPCOMM_API
#endif

// EPCOMM_LOCAL keeps a nested implementation type of an exported class (EpBuffer::Impl) out of
// the shared library's symbol table; nested classes otherwise inherit the enclosing visibility.
#if defined(__GNUC__) || defined(__clang__)
#define EPCOMM_LOCAL __attribute__((visibility("hidden")))
#else
#define EPCOMM_LOCAL
#endif
