using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Rbd;

/// <summary>
/// Drives the rbd target's ring path as a ublk queue does, without a ublk device: requests go
/// out through the backend's Submit, and an 8-byte READ of its completion eventfd on an io_uring
/// wakes this thread, which reaps the finished tags.
/// </summary>
internal sealed unsafe class RbdRing : IDisposable
{
    private const ulong NotifyData = 1;
    private readonly Ring _ring;
    private readonly ulong* _notify = (ulong*)NativeMemory.AllocZeroed(8);
    private readonly int[] _tags = new int[32];
    private readonly int[] _results = new int[32];

    private readonly bool[] _pending = new bool[4096];

    public RbdRing(RbdTarget target, int queueId = 0)
    {
        Backend = target.CreateUringBackend(queueId)!;
        Assert.True(Backend.CompletionFd >= 0, "the rbd backend completes through an fd");
        _ring = Ring.Create(new RingOptions { Entries = 8, SingleIssuer = true, DeferTaskrun = true });
        Arm();
    }

    public UringBackend Backend { get; }

    public int InFlight { get; private set; }

    /// <summary>Results by tag (valid once the tag has been reaped).</summary>
    public int[] Results { get; } = new int[4096];

    public bool[] Done { get; } = new bool[4096];

    private void Arm() => _ring.GetSqe().PrepareRead(Backend.CompletionFd, _notify, 8, 0, NotifyData);

    /// <summary>Starts a request; a negative errno at once counts as its (immediate) completion.</summary>
    public void Submit(int tag, in BackendRequest request)
    {
        Done[tag] = false;
        _pending[tag] = true;
        var r = Backend.Submit(tag, request);
        if (r < 0)
        {
            Results[tag] = r;
            Done[tag] = true;
            _pending[tag] = false;
            return;
        }
        InFlight++;
    }

    /// <summary>Waits for one wake-up of the eventfd (or the limit) and reaps; returns how many completed.</summary>
    public int Poll(TimeSpan limit)
    {
        _ring.SubmitAndWait(1, limit);
        var reaped = 0;
        while (_ring.TryGetCompletion(out var cqe))
        {
            if (cqe.user_data != NotifyData || cqe.res != 8)
            {
                Assert.Fail($"unexpected completion {cqe.user_data}: {cqe.res}");
            }
            Arm();
            int n;
            do
            {
                n = Backend.Reap(_tags, _results);
                for (var i = 0; i < n; i++)
                {
                    if (!_pending[_tags[i]])
                    {
                        // Twice, or a tag this ring never submitted (another queue's).
                        Assert.Fail($"tag {_tags[i]} completed here but was not in flight here");
                    }
                    _pending[_tags[i]] = false;
                    Results[_tags[i]] = _results[i];
                    Done[_tags[i]] = true;
                    InFlight--;
                }
                reaped += n;
            }
            while (n == _tags.Length);
        }
        return reaped;
    }

    /// <summary>Reaps until nothing is in flight; fails if that takes longer than <paramref name="limit"/>.</summary>
    public void Drain(TimeSpan limit)
    {
        var sw = Stopwatch.StartNew();
        while (InFlight > 0)
        {
            Assert.True(sw.Elapsed < limit, $"{InFlight} requests still in flight after {limit.TotalSeconds} s");
            Poll(TimeSpan.FromMilliseconds(500));
        }
    }

    public void Dispose()
    {
        _ring.Dispose();
        Backend.Dispose();
        NativeMemory.Free(_notify);
    }
}
