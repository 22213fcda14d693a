using System.Runtime.CompilerServices;
using UblkSharp.Interop;
using UblkSharp.Interop.Ceph;

namespace UblkSharp.Targets;

/// <summary>
/// One queue's librbd path: requests go out as librbd AIO from the queue thread; each completion
/// reports to this queue's <see cref="RbdCompletionMailbox"/>, whose eventfd's READ on the queue's
/// ring wakes the queue, which takes them out here. Every queue of an image has its own mailbox,
/// so the queues share the image handle (and its exclusive lock) but nothing on the hot path.
/// Per-tag state lives in arrays made once; a FUA write is a write, then a flush, on the same tag.
/// </summary>
internal sealed unsafe class RbdUringBackend : UringBackend
{
    internal const int MaxTags = 4096; // UBLK_MAX_QUEUE_DEPTH

    private readonly RbdTarget _target;
    private readonly nint _image;
    private readonly RbdCompletionMailbox _mailbox;
    private readonly Ublk.IoOp[] _ops = new Ublk.IoOp[MaxTags];
    private readonly int[] _lengths = new int[MaxTags];
    private readonly bool[] _flushAfter = new bool[MaxTags];

    public RbdUringBackend(RbdTarget target, nint image, RbdCompletionMailbox mailbox)
    {
        _target = target;
        _image = image;
        _mailbox = mailbox;
    }

    public override int CompletionFd => _mailbox.EventFd;

    public override void Prepare(ref Interop.IoUring.Sqe sqe, in BackendRequest request)
        => throw new NotSupportedException("the rbd backend completes through its eventfd, not one SQE per request");

    public override int Submit(int tag, in BackendRequest request)
    {
        _ops[tag] = request.Op;
        _lengths[tag] = (int)Math.Min(request.Length, int.MaxValue);
        _flushAfter[tag] = request.Op == Ublk.IoOp.Write && request.IsFua;
        if (_target.IsReadOnly && request.Op is not (Ublk.IoOp.Read or Ublk.IoOp.Flush))
        {
            return -Errno.EROFS;
        }
        var r = _mailbox.CreateCompletion(tag, out var c);
        if (r < 0)
        {
            return RbdTarget.MapError(r);
        }
        r = request.Op switch
        {
            Ublk.IoOp.Read => RbdAio.rbd_aio_read2(_image, (ulong)request.Offset, (nuint)request.Length, request.Buffer, c, 0),
            Ublk.IoOp.Write => RbdAio.rbd_aio_write2(_image, (ulong)request.Offset, (nuint)request.Length, request.Buffer, c, 0),
            Ublk.IoOp.Flush => RbdAio.rbd_aio_flush(_image, c),
            Ublk.IoOp.Discard => RbdAio.rbd_aio_discard(_image, (ulong)request.Offset, (ulong)request.Length, c),
            Ublk.IoOp.WriteZeroes => RbdAio.rbd_aio_write_zeroes(_image, (ulong)request.Offset, (nuint)request.Length, c,
                (request.Flags & Ublk.IoFlags.NoUnmap) != 0 ? Rbd.WriteZeroesThickProvision : 0, 0),
            _ => -Errno.EOPNOTSUPP,
        };
        if (r < 0)
        {
            RbdAio.rbd_aio_release(c);
            return RbdTarget.MapError(r);
        }
        return 0;
    }

    public override int Reap(Span<int> tags, Span<int> results)
    {
        var n = 0;
        while (n < tags.Length && _mailbox.TryTake(out var tag, out var c))
        {
            var r = (int)Math.Clamp((long)RbdAio.rbd_aio_get_return_value(c), int.MinValue, int.MaxValue);
            RbdAio.rbd_aio_release(c);
            if (r >= 0 && _flushAfter[tag])
            {
                // FUA: the data is written; it completes once a flush has made it durable.
                _flushAfter[tag] = false;
                var f = SubmitFlush(tag);
                if (f == 0)
                {
                    continue;
                }
                r = f;
            }
            tags[n] = tag;
            results[n] = Result(tag, r);
            n++;
        }
        return n;
    }

    private int SubmitFlush(int tag)
    {
        var r = _mailbox.CreateCompletion(tag, out var c);
        if (r < 0)
        {
            return RbdTarget.MapError(r);
        }
        r = RbdAio.rbd_aio_flush(_image, c);
        if (r < 0)
        {
            RbdAio.rbd_aio_release(c);
            return RbdTarget.MapError(r);
        }
        return 0;
    }

    // librbd returns bytes for reads and 0 (or the length) for the rest; the runtime wants bytes
    // done for READ/WRITE and 0 for the others.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private int Result(int tag, int r) => r < 0 ? RbdTarget.MapError(r) : _ops[tag] switch
    {
        Ublk.IoOp.Read => r,
        Ublk.IoOp.Write => _lengths[tag],
        _ => 0,
    };
}
