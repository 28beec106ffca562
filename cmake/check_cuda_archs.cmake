# Run by the target fastmtl_cuda_compile_check after the CUDA objects are built: fails unless every
# CUDA object embeds device code (SASS) for each architecture asked for. nvcc writes "-arch sm_NN"
# into the fatbinary of each cubin; file(STRINGS) reads it without any CUDA tool (cuobjdump is not
# in every toolkit install).
#   cmake -DOBJECTS="a.cu.o|b.cu.o" -DARCHS="80|90" -P check_cuda_archs.cmake
string(REPLACE "|" ";" _objects "${OBJECTS}")
string(REPLACE "|" ";" ARCHS "${ARCHS}")
set(_checked 0)
foreach(_obj IN LISTS _objects)
  if(NOT _obj MATCHES "\\.cu\\.o$")
    continue()
  endif()
  file(STRINGS "${_obj}" _found REGEX "-arch sm_[0-9]+")
  foreach(_arch IN LISTS ARCHS)
    string(FIND "${_found}" "-arch sm_${_arch}" _at)
    if(_at EQUAL -1)
      message(FATAL_ERROR "fastmtl CUDA compile check: ${_obj} has no device code for sm_${_arch} (found: ${_found})")
    endif()
  endforeach()
  math(EXPR _checked "${_checked} + 1")
endforeach()
if(_checked EQUAL 0)
  message(FATAL_ERROR "fastmtl CUDA compile check: no CUDA object among '${OBJECTS}'")
endif()
message(STATUS "fastmtl CUDA compile check: ${_checked} CUDA objects, each with SASS for sm_${ARCHS}")
