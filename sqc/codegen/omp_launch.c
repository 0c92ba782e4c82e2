/* Runs a TVM kernel's parallel loops on torch's OpenMP team instead of TVM's own thread pool.
 *
 * Linked into every CPU kernel library sqc builds. Two thread pools on the same cores stall each other:
 * each spins after its work, and a TVM worker pinned to a core waits behind torch's OpenMP worker (a
 * SmolLM2 decode step took 30 ms with one pool and 280-460 ms with both). TVM's generated code calls its
 * parallel launcher through the function pointer `__TVMBackendParallelLaunch`, which TVM's loader fills in;
 * sqc's runtime points it at `sqc_parallel_launch` after handing this library torch's OpenMP entry points
 * (`sqc_omp_init`), so the library needs no OpenMP at link time and no compiler at run time.
 *
 * The team is asked for num_task threads (0: omp_get_max_threads(), which follows torch.set_num_threads);
 * should OpenMP give fewer, each thread runs every team-size-th task, so no task is skipped.
 */
#include <stdint.h>

#ifdef __cplusplus  /* TVM links with g++ */
extern "C" {
#endif

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

typedef void (*gomp_parallel_fn)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*omp_int_fn)(void);

static gomp_parallel_fn gomp_parallel;
static omp_int_fn thread_num, num_threads, max_threads;

struct sqc_job {
  FTVMParallelLambda f;
  void* cdata;
  TVMParallelGroupEnv env;
  int err;
};

static void sqc_team_body(void* p) {
  struct sqc_job* j = (struct sqc_job*)p;
  int team = num_threads();
  for (int t = thread_num(); t < j->env.num_task; t += team) {
    int r = j->f(t, &j->env, j->cdata);
    if (r) __atomic_store_n(&j->err, r, __ATOMIC_RELAXED);
  }
}

/* 0 when all four entry points are given. */
int sqc_omp_init(void* parallel, void* get_thread_num, void* get_num_threads, void* get_max_threads) {
  if (!parallel || !get_thread_num || !get_num_threads || !get_max_threads) return -1;
  gomp_parallel = (gomp_parallel_fn)parallel;
  thread_num = (omp_int_fn)get_thread_num;
  num_threads = (omp_int_fn)get_num_threads;
  max_threads = (omp_int_fn)get_max_threads;
  return 0;
}

int sqc_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : max_threads();
  struct sqc_job j = {f, cdata, {0, n}, 0};
  if (n <= 1) return f(0, &j.env, cdata);
  gomp_parallel(sqc_team_body, &j, (unsigned)n, 0);
  return j.err;
}

#ifdef __cplusplus
}
#endif
