namespace UblkSharp.Nbd;

/// <summary>A unit of work for <see cref="NbdWorkerPool"/>.</summary>
internal interface INbdWork
{
    void Execute();
}

/// <summary>
/// Threads that run target calls which may block (disk IO, a remote server), shared by all of a
/// server's connections. Threads start on demand up to the limit and live until the pool is
/// disposed; queueing allocates nothing once the queue has grown.
/// </summary>
internal sealed class NbdWorkerPool : IDisposable
{
    private readonly object _lock = new();
    private readonly Queue<INbdWork> _queue = new();
    private readonly List<Thread> _threads = [];
    private readonly int _max;
    private readonly Action<Exception> _onError;
    private int _idle;
    private bool _disposed;

    public NbdWorkerPool(int maxThreads, Action<Exception> onError)
    {
        _max = maxThreads;
        _onError = onError;
    }

    public int ThreadCount
    {
        get
        {
            lock (_lock)
            {
                return _threads.Count;
            }
        }
    }

    /// <summary>Queues the work; false once the pool is disposed (the caller then runs it itself).</summary>
    public bool TryEnqueue(INbdWork work)
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return false;
            }
            _queue.Enqueue(work);
            if (_idle > 0)
            {
                Monitor.Pulse(_lock);
            }
            // A pulsed thread counts as idle until it runs: more work waiting than idle threads to
            // take it needs another thread (else a slow call would hold up the work queued behind it).
            if (_queue.Count > _idle && _threads.Count < _max)
            {
                var t = new Thread(Run, 256 * 1024) { IsBackground = true, Name = $"nbd-worker{_threads.Count}" };
                _threads.Add(t);
                t.Start();
            }
        }
        return true;
    }

    private void Run()
    {
        while (true)
        {
            INbdWork work;
            lock (_lock)
            {
                while (_queue.Count == 0)
                {
                    if (_disposed)
                    {
                        return;
                    }
                    _idle++;
                    Monitor.Wait(_lock);
                    _idle--;
                }
                work = _queue.Dequeue();
            }
            try
            {
                work.Execute();
            }
            catch (Exception e)
            {
                // Execute handles target failures itself; anything here is a bug. Keep the thread.
                _onError(e);
            }
        }
    }

    public void Dispose() => Dispose(TimeSpan.FromSeconds(30));

    /// <summary>Lets queued work finish, then ends the threads (waits up to <paramref name="timeout"/>).</summary>
    public void Dispose(TimeSpan timeout)
    {
        Thread[] threads;
        lock (_lock)
        {
            _disposed = true;
            Monitor.PulseAll(_lock);
            threads = [.. _threads];
        }
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        foreach (var t in threads)
        {
            t.Join(TimeSpan.FromMilliseconds(Math.Max(0, deadline - Environment.TickCount64)));
        }
    }
}
