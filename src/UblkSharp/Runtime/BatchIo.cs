using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// One queue's batched IO commands (BATCH_IO, Linux 7.0+), in place of a FETCH and a
/// COMMIT_AND_FETCH per request: PREP_IO_CMDS hands the driver every tag once; two multishot
/// FETCH_IO_CMDS, each on its own incremental provided buffer, bring the tags of new requests, many
/// per completion; and the commits of a pass of the queue loop go as one COMMIT_IO_CMDS. Queue thread
/// only; nothing is allocated after construction.
/// </summary>
internal sealed unsafe class BatchIo : IDisposable
{
    /// <summary>What a batch command's completion is (user_data bits 32-39, beside the queue's kind bits).</summary>
    public const ulong SubFetch = 1ul << 32;
    public const ulong SubCommit = 2ul << 32;
    public const ulong SubPrep = 3ul << 32;
    public const ulong SubMask = 0xfful << 32;

    private const int FetchCommands = 2;
    private const int CommitBuffers = 4;

    private readonly Ring _ring;
    private readonly int _queueId;
    private readonly int _depth;
    private readonly ulong _userDataKind;
    private readonly ushort _flags;
    private readonly int _elemBytes;
    private readonly MappedMemory _fetchMemory;
    private readonly int _fetchBytes;
    private readonly BufferRing?[] _fetchRings = new BufferRing?[FetchCommands];
    private readonly int[] _fetchOffset = new int[FetchCommands];
    // The tags of one fetch completion, copied out: a re-armed fetch may write its buffer again
    // while they are being served (an SQ that fills up submits).
    private readonly ushort[] _tags;
    private readonly MappedMemory _commitMemory;
    private readonly int _commitBytes;
    // Per commit buffer: elements written, and whether a command holding it is in flight.
    private readonly int[] _commitCount = new int[CommitBuffers];
    private readonly bool[] _commitBusy = new bool[CommitBuffers];
    private int _current;

    /// <param name="ring">The queue's ring (created on the queue thread).</param>
    /// <param name="queueId">The queue.</param>
    /// <param name="depth">Its tags.</param>
    /// <param name="userDataKind">The queue's kind bits for its commands; the batch's sub-kind and index go beside them.</param>
    /// <param name="withAddress">Copy mode: each element carries the tag's buffer address (the driver copies into it).</param>
    /// <param name="autoBufReg">AUTO_BUF_REG: each element's buffer index is its tag, with the fallback flag.</param>
    public BatchIo(Ring ring, int queueId, int depth, ulong userDataKind, bool withAddress, bool autoBufReg)
    {
        _ring = ring;
        _queueId = queueId;
        _depth = depth;
        _userDataKind = userDataKind;
        _flags = withAddress ? BatchIoCmd.HasBufAddr : autoBufReg ? BatchIoCmd.AutoBufRegFallback : (ushort)0;
        _elemBytes = withAddress ? 16 : 8;
        // A tag is 2 bytes; a page holds 2048, so a fetch runs dry (and is re-armed) at most every 2048 requests.
        _fetchBytes = RoundToPage(depth * 2);
        _tags = new ushort[_fetchBytes / 2];
        _fetchMemory = MappedMemory.MapAnonymous((nuint)(_fetchBytes * FetchCommands), $"ublk queue {queueId} batch fetch buffers");
        _commitBytes = RoundToPage(depth * _elemBytes);
        _commitMemory = MappedMemory.MapAnonymous((nuint)(_commitBytes * CommitBuffers), $"ublk queue {queueId} batch commit buffers");
        try
        {
            for (var g = 0; g < FetchCommands; g++)
            {
                _fetchRings[g] = BufferRing.Register(ring, (ushort)g, 1, incremental: true);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>Commits refused by the driver (a COMMIT_IO_CMDS that handled fewer elements than it was given); 0 unless something is wrong.</summary>
    public long CommitFailures { get; private set; }

    private static int RoundToPage(int n) => (n + 4095) & ~4095;

    private byte* CommitBuffer(int i) => _commitMemory.Pointer + ((long)i * _commitBytes);

    private byte* FetchBuffer(int g) => _fetchMemory.Pointer + ((long)g * _fetchBytes);

    /// <summary>PREP_IO_CMDS with every tag (each tag's buffer from <paramref name="buffers"/> in copy mode), then both fetches.</summary>
    public void Start(byte*[] buffers)
    {
        var b = CommitBuffer(_current);
        for (var tag = 0; tag < _depth; tag++)
        {
            WriteElem(b + ((long)tag * _elemBytes), tag, 0, buffers[tag]);
        }
        _commitCount[_current] = _depth;
        // PREP is done inline at submission, before the fetches that follow it in the SQ.
        Submit(UblkCommands.PrepIoCmds);
        _current = 1; // buffer 0 is PREP's until its completion
        _commitCount[1] = 0;
        for (var g = 0; g < FetchCommands; g++)
        {
            ArmFetch(g);
        }
    }

    private void WriteElem(byte* p, int tag, int result, byte* buffer)
    {
        *(BatchElem*)p = new BatchElem { tag = (ushort)tag, buf_index = (ushort)tag, result = result };
        if (_elemBytes == 16)
        {
            *(ulong*)(p + 8) = (ulong)buffer;
        }
    }

    /// <summary>Queues a request's result; it goes with the pass's other commits at <see cref="Flush"/>.</summary>
    public void Commit(int tag, int result, byte* buffer)
    {
        // Each tag is committed at most once per request, so a buffer of depth elements never overflows.
        var i = _current;
        WriteElem(CommitBuffer(i) + ((long)_commitCount[i] * _elemBytes), tag, result, buffer);
        _commitCount[i]++;
    }

    /// <summary>
    /// Sends the queued commits as one COMMIT_IO_CMDS, unless every buffer is still in flight (then
    /// the next pass does). True when a command went: its completion is one the loop should not
    /// count as something to do.
    /// </summary>
    public bool Flush()
    {
        if (_commitCount[_current] == 0)
        {
            return false;
        }
        var next = -1;
        for (var k = 1; k < CommitBuffers; k++)
        {
            var i = (_current + k) % CommitBuffers;
            if (!_commitBusy[i])
            {
                next = i;
                break;
            }
        }
        if (next < 0)
        {
            return false; // a completion frees one, and wakes the loop that flushes again
        }
        Submit(UblkCommands.CommitIoCmds);
        _current = next;
        _commitCount[next] = 0;
        return true;
    }

    private void Submit(uint op)
    {
        var i = _current;
        var n = _commitCount[i];
        var cmd = new BatchIoCmd { q_id = (ushort)_queueId, flags = _flags, nr_elem = (ushort)n, elem_bytes = (byte)_elemBytes };
        var sub = op == UblkCommands.PrepIoCmds ? SubPrep : SubCommit;
        ref var sqe = ref _ring.PrepareUringCmd(0, op, cmd, _userDataKind | sub | (uint)i | ((ulong)(uint)n << 40));
        sqe.flags |= SqeFlags.FixedFile;
        sqe.addr = (ulong)CommitBuffer(i);
        sqe.len = (uint)(n * _elemBytes);
        _commitBusy[i] = true;
    }

    /// <summary>
    /// A PREP_IO_CMDS or COMMIT_IO_CMDS completed: its buffer is free again. PREP answers 0, a
    /// COMMIT the bytes of the elements it took; <paramref name="taken"/> and <paramref name="count"/>
    /// say how many of how many it took (all, normally).
    /// </summary>
    public void OnCommitted(ulong userData, int res, out int taken, out int count)
    {
        var i = (int)(userData & 0xffff);
        count = (int)((userData >> 40) & 0xffff);
        _commitBusy[i] = false;
        taken = res < 0 ? 0 : (userData & SubMask) == SubPrep ? count : res / _elemBytes;
        if (taken != count)
        {
            CommitFailures++;
        }
    }

    private void ArmFetch(int g)
    {
        var br = _fetchRings[g]!;
        br.Add(FetchBuffer(g), (uint)_fetchBytes, 0);
        br.Advance(1);
        _fetchOffset[g] = 0;
        var cmd = new BatchIoCmd { q_id = (ushort)_queueId, nr_elem = (ushort)Math.Min(ushort.MaxValue, _fetchBytes / 2), elem_bytes = 2 };
        ref var sqe = ref _ring.PrepareUringCmd(0, UblkCommands.FetchIoCmds, cmd, _userDataKind | SubFetch | (uint)g);
        sqe.flags |= SqeFlags.FixedFile | SqeFlags.BufferSelect;
        sqe.op_flags = UringCmdFlags.Multishot;
        sqe.buf_group = br.GroupId;
    }

    /// <summary>
    /// A fetch's completion: the tags of the requests it brought (empty for an error), read from
    /// where the previous one ended in the same incremental buffer. A fetch that ended (no
    /// <see cref="CqeFlags.More"/>) is re-armed unless the queue is being torn down (ABORT); returns
    /// false in that case, when no request will come through it any more.
    /// </summary>
    public bool OnFetched(ulong userData, int res, uint cqeFlags, out ReadOnlySpan<ushort> tags)
    {
        var g = (int)(userData & 0xffff);
        tags = default;
        if (res > 0)
        {
            var n = Math.Min(res / 2, (_fetchBytes - _fetchOffset[g]) / 2);
            new ReadOnlySpan<ushort>(FetchBuffer(g) + _fetchOffset[g], n).CopyTo(_tags);
            tags = new ReadOnlySpan<ushort>(_tags, 0, n);
            _fetchOffset[g] += res;
        }
        if ((cqeFlags & CqeFlags.More) != 0)
        {
            return true;
        }
        if (res == UblkCommands.IoResAbort)
        {
            return false;
        }
        if (res >= 0 || res == -Errno.ENOBUFS)
        {
            // The buffer ran out or the command ended: start the group afresh (how much of the
            // buffer the kernel used is not said when a command ends early), and fetch again.
            _fetchRings[g]!.Reset();
            ArmFetch(g);
            return true;
        }
        return false;
    }

    public void Dispose()
    {
        foreach (var br in _fetchRings)
        {
            br?.Dispose();
        }
        _fetchMemory.Dispose();
        _commitMemory.Dispose();
    }
}
