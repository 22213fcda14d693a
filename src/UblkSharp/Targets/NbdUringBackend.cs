using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Ublk;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Targets;

/// <summary>
/// An <see cref="NbdTarget"/>'s IO on one queue's io_uring: one connection per queue, every tag's
/// request in flight on it at once (NBD allows any number), replies matched to requests by cookie.
/// Nothing blocks the queue thread:
/// <list type="bullet">
/// <item>requests go out with SENDMSG, one at a time so two never interleave on the stream, a
/// short send continued;</item>
/// <item>one RECV is always pending for the next reply header, then one for a read's payload,
/// straight into the tag's buffer;</item>
/// <item>a timer on the ring checks every request against its deadline (<see cref="NbdTargetOptions.Timeout"/>
/// from its start): a request past it means the server stopped answering (perhaps vanished without
/// a reset), so the connection is dropped, requests past their deadline fail with EIO and the others
/// are sent again on a new connection (NBD requests are idempotent);</item>
/// <item>connecting and the handshake, the only blocking parts, run on a short-lived thread of
/// their own, whose end is signalled through an eventfd read on the ring.</item>
/// </list>
/// Once a request has failed by its deadline, requests that find no connection fail as soon as one
/// attempt to connect fails, until one gets through (as the synchronous path: try once each).
/// </summary>
internal sealed unsafe class NbdUringBackend : UringBackend
{
    private const uint StepSend = 1;
    private const uint StepRecv = 2;
    private const uint StepTimer = 3;
    private const uint StepConnected = 4;
    private const uint StepIgnore = 5;
    private const uint MaxRangeChunk = 1u << 30;
    // Per tag: the request header (28 bytes, at 0), a msghdr (at 32) and two iovecs (at 96).
    private const int NativeBytes = 128;

    private readonly NbdTarget _target;
    private readonly long _timeoutTicks;
    private readonly TimeSpan _connectTimeout;
    private readonly int _queueId;
    private readonly Queue<int> _sendQueue = new();
    private readonly List<Connection> _closing = [];
    private readonly object _connectLock = new();
    private Slot[] _slots = [];
    private nint[] _native = [];
    private Connection? _connection;
    private uint _generation;
    private ulong _sequence;

    // The send in flight (one at a time).
    private bool _sending;
    private int _sendTag;
    private int _sendDone;
    private int _sendTotal;

    // The receive in flight: a reply header, or a read's payload for _recvTag.
    private byte* _reply;
    private bool _inPayload;
    private int _recvTag;
    private int _recvDone;

    private KernelTimespec* _tick;
    private bool _timerArmed;
    private ulong _timerUserData;
    private int _active;

    // Connecting: the thread's result, handed over through _connectFd.
    private readonly int _connectFd;
    private ulong* _connectBuffer;
    private bool _connecting;
    private bool _connectReadPending;
    private Socket? _connectedSocket;
    private Exception? _connectError;
    private long _nextAttempt;
    private int _backoffMs = 50;
    private bool _down;
    private bool _ending;
    private bool _disposed;
    private int _reported;

    public NbdUringBackend(NbdTarget target, int queueId, NbdClient? first)
    {
        _target = target;
        _queueId = queueId;
        _timeoutTicks = (long)target.Options.Timeout.TotalMilliseconds;
        _connectTimeout = target.Options.ConnectTimeout < target.Options.Timeout ? target.Options.ConnectTimeout : target.Options.Timeout;
        // First, as it may fail (over TLS it makes a socketpair) before anything needs undoing.
        var socket = first?.TakeSocket();
        _connectFd = Libc.eventfd(0, Libc.EFD_CLOEXEC);
        if (_connectFd < 0)
        {
            socket?.Dispose();
            throw new ErrnoException(Marshal.GetLastPInvokeError(), "eventfd");
        }
        _reply = (byte*)NativeMemory.AllocZeroed(SimpleReplySize);
        _connectBuffer = (ulong*)NativeMemory.AllocZeroed(sizeof(ulong));
        _tick = (KernelTimespec*)NativeMemory.AllocZeroed((nuint)sizeof(KernelTimespec));
        // A tick a tenth of the timeout (10 ms to 500 ms): a request fails at most that late.
        *_tick = KernelTimespec.From(TimeSpan.FromMilliseconds(Math.Clamp(_timeoutTicks / 10, 10, 500)));
        if (socket is not null)
        {
            _connection = Open(socket);
        }
    }

    public override bool RunsSteps => true;

    public override void Prepare(ref Sqe sqe, in BackendRequest request) => throw new NotSupportedException("the nbd backend runs its own steps");

    /// <summary>What one tag's request has got to.</summary>
    private struct Slot
    {
        public bool Active;
        /// <summary>In the send queue (maybe from an earlier request of the tag's, now ended).</summary>
        public bool Queued;
        public ulong Cookie;
        public ushort Type;
        public ushort CmdFlags;
        /// <summary>The NBD command in hand: its offset and length.</summary>
        public long Offset;
        public uint Length;
        /// <summary>For TRIM and WRITE_ZEROES, served in chunks: where the whole range ends.</summary>
        public long RangeEnd;
        /// <summary>The data's address, or under zero copy its offset into buffer-table slot <see cref="Fixed"/>.</summary>
        public byte* Buffer;
        /// <summary>Under zero copy, the request's slot in the ring's buffer table (the payload moves between its pages and the socket); else -1.</summary>
        public int Fixed;
        /// <summary>A FUA write to a server without FUA: a FLUSH follows it.</summary>
        public bool ThenFlush;
        public int Result;
        public long Deadline;
    }

    private sealed class Connection(Socket socket, uint generation)
    {
        public Socket Socket { get; } = socket;
        public int Fd { get; } = (int)socket.Handle;
        public uint Generation { get; } = generation;
        public int Outstanding { get; set; }

        public bool Receiving { get; set; }
    }

    private static uint Step(uint kind, uint generation = 0) => kind | (generation << 8);

    private ref Slot SlotOf(int tag)
    {
        if (tag >= _slots.Length)
        {
            // Grows while the queue warms up (tags appear as the depth is used), then never again.
            var n = Math.Max(tag + 1, Math.Max(16, _slots.Length * 2));
            Array.Resize(ref _slots, n);
            Array.Resize(ref _native, n);
        }
        if (_native[tag] == 0)
        {
            // Never moved or freed while the backend lives: a SENDMSG in flight points into it.
            _native[tag] = (nint)NativeMemory.AllocZeroed(NativeBytes);
        }
        return ref _slots[tag];
    }

    public override int Start(IBackendRing ring, int tag, in BackendRequest request)
    {
        ref var s = ref SlotOf(tag);
        // An entry of an earlier request may still be in the send queue (it failed while waiting).
        var queued = s.Queued;
        s = default;
        s.Queued = queued;
        switch (request.Op)
        {
            case IoOp.Read:
                s.Type = CmdRead;
                s.Length = (uint)Math.Min(request.Length, _target.MaxPayload);
                break;
            case IoOp.Write:
                if (_target.IsReadOnly)
                {
                    return -Errno.EROFS;
                }
                s.Type = CmdWrite;
                s.Length = (uint)Math.Min(request.Length, _target.MaxPayload);
                if (request.IsFua)
                {
                    if (_target.HasNativeFua)
                    {
                        s.CmdFlags = CmdFlagFua;
                    }
                    else
                    {
                        s.ThenFlush = _target.HasVolatileCache;
                    }
                }
                break;
            case IoOp.Flush:
                if (!_target.HasVolatileCache)
                {
                    return 0;
                }
                s.Type = CmdFlush;
                break;
            case IoOp.Discard:
                if (!_target.CanDiscard)
                {
                    return -Errno.EOPNOTSUPP;
                }
                s.Type = CmdTrim;
                s.Length = (uint)Math.Min(request.Length, MaxRangeChunk);
                break;
            case IoOp.WriteZeroes:
                if (!_target.CanWriteZeroes)
                {
                    return -Errno.EOPNOTSUPP;
                }
                s.Type = CmdWriteZeroes;
                s.CmdFlags = (request.Flags & IoFlags.NoUnmap) != 0 ? CmdFlagNoHole : (ushort)0;
                s.Length = (uint)Math.Min(request.Length, MaxRangeChunk);
                break;
            default:
                return -Errno.EOPNOTSUPP;
        }
        if (request.Length == 0 && s.Type is CmdRead or CmdWrite)
        {
            return 0;
        }
        s.Offset = request.Offset;
        s.RangeEnd = request.Offset + request.Length;
        s.Buffer = request.Buffer;
        s.Fixed = request.FixedBuffer;
        s.Result = s.Type is CmdRead or CmdWrite ? (int)s.Length : 0;
        s.Deadline = Environment.TickCount64 + _timeoutTicks;
        s.Active = true;
        _active++;
        Enqueue(ring, tag);
        ArmTimer(ring);
        return Pending;
    }

    private void Enqueue(IBackendRing ring, int tag)
    {
        ref var s = ref _slots[tag];
        s.Cookie = (++_sequence << 16) | (uint)tag;
        if (!s.Queued)
        {
            s.Queued = true;
            _sendQueue.Enqueue(tag);
        }
        if (_connection is not null)
        {
            if (!_connection.Receiving)
            {
                _connection.Receiving = true;
                SubmitRecv(ring);
            }
            SendNext(ring);
        }
        else
        {
            Connect(ring);
        }
    }

    public override void OnStep(IBackendRing ring, int tag, uint stepId, int res)
    {
        var kind = stepId & 0xff;
        var generation = stepId >> 8;
        switch (kind)
        {
            case StepSend:
            case StepRecv:
                if (_connection is null || generation != (_connection.Generation & 0xffffff))
                {
                    Retire(generation);
                    return;
                }
                _connection.Outstanding--;
                if (kind == StepSend)
                {
                    OnSend(ring, res);
                }
                else
                {
                    OnRecv(ring, res);
                }
                break;
            case StepTimer:
                _timerArmed = false;
                OnTick(ring);
                break;
            case StepConnected:
                _connectReadPending = false;
                OnConnected(ring);
                break;
        }
    }

    /// <summary>A completion on a connection already dropped: its socket closes once nothing of it is pending.</summary>
    private void Retire(uint generation)
    {
        for (var i = 0; i < _closing.Count; i++)
        {
            var c = _closing[i];
            if ((c.Generation & 0xffffff) == generation && --c.Outstanding == 0)
            {
                c.Socket.Dispose();
                _closing.RemoveAt(i);
                return;
            }
        }
    }

    private void SendNext(IBackendRing ring)
    {
        while (!_sending && _sendQueue.Count > 0)
        {
            var tag = _sendQueue.Dequeue();
            ref var s = ref _slots[tag];
            s.Queued = false;
            if (!s.Active)
            {
                continue;
            }
            var header = (byte*)_native[tag];
            var h = new Span<byte>(header, RequestSize);
            BinaryPrimitives.WriteUInt32BigEndian(h, RequestMagic);
            BinaryPrimitives.WriteUInt16BigEndian(h[4..], s.CmdFlags);
            BinaryPrimitives.WriteUInt16BigEndian(h[6..], s.Type);
            BinaryPrimitives.WriteUInt64BigEndian(h[8..], s.Cookie);
            BinaryPrimitives.WriteUInt64BigEndian(h[16..], (ulong)s.Offset);
            BinaryPrimitives.WriteUInt32BigEndian(h[24..], s.Length);
            _sending = true;
            _sendTag = tag;
            _sendDone = 0;
            _sendTotal = RequestSize + (s.Type == CmdWrite ? (int)s.Length : 0);
            SubmitSend(ring);
        }
    }

    private void SubmitSend(IBackendRing ring)
    {
        var tag = _sendTag;
        ref var s = ref _slots[tag];
        var c = _connection!;
        if (s.Fixed >= 0 && _sendDone >= RequestSize)
        {
            // Zero copy: the payload goes from the request's pages to the socket, after the header.
            var sent = _sendDone - RequestSize;
            ref var w = ref ring.GetSqe(tag, Step(StepSend, c.Generation & 0xffffff), out var wud);
            w.PrepareWriteFixed(c.Fd, s.Buffer + sent, s.Length - (uint)sent, 0, (ushort)s.Fixed, wud);
            c.Outstanding++;
            return;
        }
        var block = (byte*)_native[tag];
        var msg = (MsgHdr*)(block + 32);
        var iov = (Iovec*)(block + 96);
        *msg = default;
        msg->msg_iov = iov;
        var done = _sendDone;
        var n = 0;
        if (done < RequestSize)
        {
            iov[n++] = new Iovec { iov_base = block + done, iov_len = (nuint)(RequestSize - done) };
            done = 0;
        }
        else
        {
            done -= RequestSize;
        }
        if (s.Type == CmdWrite && s.Fixed < 0 && done < s.Length)
        {
            iov[n++] = new Iovec { iov_base = s.Buffer + done, iov_len = (nuint)(s.Length - done) };
        }
        msg->msg_iovlen = (nuint)n;
        ref var sqe = ref ring.GetSqe(tag, Step(StepSend, c.Generation & 0xffffff), out var ud);
        sqe.PrepareSendMsg(c.Fd, msg, MsgFlags.NoSignal, ud);
        c.Outstanding++;
    }

    private void OnSend(IBackendRing ring, int res)
    {
        if (res is -Errno.EAGAIN or -Errno.EINTR)
        {
            SubmitSend(ring);
            return;
        }
        if (res <= 0)
        {
            _sending = false;
            Break(ring, res == 0 ? "the connection closed" : $"send failed: {Errno.Describe(res)}");
            return;
        }
        _sendDone += res;
        if (_sendDone < _sendTotal)
        {
            SubmitSend(ring);
            return;
        }
        _sending = false;
        SendNext(ring);
    }

    private void SubmitRecv(IBackendRing ring)
    {
        var c = _connection!;
        ref var sqe = ref ring.GetSqe(IBackendRing.NoTag, Step(StepRecv, c.Generation & 0xffffff), out var ud);
        if (_inPayload)
        {
            ref var s = ref _slots[_recvTag];
            if (s.Fixed >= 0)
            {
                // Zero copy: the payload goes from the socket into the request's pages (a short
                // read, as without MSG_WAITALL, is resumed like a short receive).
                sqe.PrepareReadFixed(c.Fd, s.Buffer + _recvDone, s.Length - (uint)_recvDone, 0, (ushort)s.Fixed, ud);
            }
            else
            {
                sqe.PrepareRecv(c.Fd, s.Buffer + _recvDone, s.Length - (uint)_recvDone, MsgFlags.WaitAll, ud);
            }
        }
        else
        {
            sqe.PrepareRecv(c.Fd, _reply + _recvDone, (uint)(SimpleReplySize - _recvDone), MsgFlags.WaitAll, ud);
        }
        c.Outstanding++;
    }

    private void OnRecv(IBackendRing ring, int res)
    {
        if (res is -Errno.EAGAIN or -Errno.EINTR)
        {
            SubmitRecv(ring);
            return;
        }
        if (res <= 0)
        {
            Break(ring, res == 0 ? "the server closed the connection" : $"receive failed: {Errno.Describe(res)}");
            return;
        }
        _recvDone += res;
        if (_inPayload)
        {
            ref var s = ref _slots[_recvTag];
            if (_recvDone < s.Length)
            {
                SubmitRecv(ring);
                return;
            }
            _inPayload = false;
            _recvDone = 0;
            Finish(ring, _recvTag, 0);
            SubmitRecv(ring);
            return;
        }
        if (_recvDone < SimpleReplySize)
        {
            SubmitRecv(ring);
            return;
        }
        _recvDone = 0;
        var reply = new ReadOnlySpan<byte>(_reply, SimpleReplySize);
        var magic = BinaryPrimitives.ReadUInt32BigEndian(reply);
        var error = BinaryPrimitives.ReadUInt32BigEndian(reply[4..]);
        var cookie = BinaryPrimitives.ReadUInt64BigEndian(reply[8..]);
        var tag = (int)(cookie & 0xffff);
        if (magic != SimpleReplyMagic || tag >= _slots.Length || !_slots[tag].Active || _slots[tag].Cookie != cookie)
        {
            Break(ring, "the server sent a reply that matches no request");
            return;
        }
        if (error == ESHUTDOWN)
        {
            Break(ring, "the server is shutting down");
            return;
        }
        if (error == 0 && _slots[tag].Type == CmdRead)
        {
            _inPayload = true;
            _recvTag = tag;
            SubmitRecv(ring);
            return;
        }
        Finish(ring, tag, FromNbdError(error));
        SubmitRecv(ring);
    }

    /// <summary>One NBD command of the tag's request has its reply: the next one, or the request's result.</summary>
    private void Finish(IBackendRing ring, int tag, int error)
    {
        ref var s = ref _slots[tag];
        if (error == 0)
        {
            if (s.Type is CmdTrim or CmdWriteZeroes && s.Offset + s.Length < s.RangeEnd)
            {
                s.Offset += s.Length;
                s.Length = (uint)Math.Min(s.RangeEnd - s.Offset, MaxRangeChunk);
                Enqueue(ring, tag);
                return;
            }
            if (s.ThenFlush)
            {
                s.ThenFlush = false;
                s.Type = CmdFlush;
                s.CmdFlags = 0;
                s.Offset = 0;
                s.Length = 0;
                Enqueue(ring, tag);
                return;
            }
        }
        End(ring, tag, error < 0 ? error : s.Result);
    }

    private void End(IBackendRing ring, int tag, int result)
    {
        ref var s = ref _slots[tag];
        s.Active = false;
        _active--;
        if (result >= 0)
        {
            _down = false;
        }
        ring.Complete(tag, result);
    }

    /// <summary>
    /// Drops the connection: requests past their deadline fail with EIO, the rest are sent again
    /// on a new one.
    /// </summary>
    private void Break(IBackendRing ring, string why)
    {
        var c = _connection;
        if (c is null)
        {
            return;
        }
        _connection = null;
        _target.CountReconnect();
        Report($"connection {c.Generation}: {why}");
        try
        {
            // Ends its pending receive (and any send) at once; the socket closes once they are back,
            // so its descriptor cannot be reused under an SQE not yet submitted.
            c.Socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        if (c.Outstanding > 0)
        {
            _closing.Add(c);
        }
        else
        {
            c.Socket.Dispose();
        }
        _sending = false;
        _inPayload = false;
        _recvDone = 0;
        _sendQueue.Clear();
        var now = Environment.TickCount64;
        for (var tag = 0; tag < _slots.Length; tag++)
        {
            ref var s = ref _slots[tag];
            s.Queued = false;
            if (!s.Active)
            {
                continue;
            }
            if (now >= s.Deadline)
            {
                _down = true;
                End(ring, tag, -Errno.EIO);
            }
            else
            {
                s.Cookie = (++_sequence << 16) | (uint)tag;
                s.Queued = true;
                _sendQueue.Enqueue(tag);
            }
        }
        if (_sendQueue.Count > 0 && !_ending)
        {
            Connect(ring);
        }
    }

    private void OnTick(IBackendRing ring)
    {
        if (_ending)
        {
            return;
        }
        var now = Environment.TickCount64;
        var late = false;
        for (var tag = 0; tag < _slots.Length && !late; tag++)
        {
            late = _slots[tag].Active && now >= _slots[tag].Deadline;
        }
        if (late)
        {
            if (_connection is not null)
            {
                Break(ring, $"no reply within {_target.Options.Timeout.TotalSeconds:0.###} s");
            }
            else
            {
                FailLate(ring, now);
            }
        }
        if (_connection is null && _sendQueue.Count > 0)
        {
            Connect(ring);
        }
        ArmTimer(ring);
    }

    private void FailLate(IBackendRing ring, long now)
    {
        for (var tag = 0; tag < _slots.Length; tag++)
        {
            if (_slots[tag].Active && now >= _slots[tag].Deadline)
            {
                _down = true;
                End(ring, tag, -Errno.EIO);
            }
        }
    }

    private void ArmTimer(IBackendRing ring)
    {
        if (_timerArmed || _ending || (_active == 0 && !_connecting))
        {
            return;
        }
        ref var sqe = ref ring.GetSqe(IBackendRing.NoTag, Step(StepTimer), out var ud);
        sqe.PrepareTimeout(_tick, 0, TimeoutFlags.None, ud);
        _timerUserData = ud;
        _timerArmed = true;
    }

    /// <summary>Starts connecting on a thread of its own, unless that is under way or must wait for its backoff.</summary>
    private void Connect(IBackendRing ring)
    {
        if (_connecting || _ending || Environment.TickCount64 < _nextAttempt)
        {
            return;
        }
        _connecting = true;
        if (!_connectReadPending)
        {
            ref var sqe = ref ring.GetSqe(IBackendRing.NoTag, Step(StepConnected), out var ud);
            sqe.PrepareRead(_connectFd, _connectBuffer, sizeof(ulong), 0, ud);
            _connectReadPending = true;
        }
        var thread = new Thread(ConnectThread) { IsBackground = true, Name = $"nbd-connect-q{_queueId}" };
        thread.Start();
    }

    private void ConnectThread()
    {
        Socket? socket = null;
        Exception? error = null;
        try
        {
            // Taken here, not on the queue thread: over TLS this starts the connection's relay.
            socket = _target.Connect(_connectTimeout).TakeSocket();
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            error = e;
        }
        lock (_connectLock)
        {
            if (_disposed)
            {
                socket?.Dispose();
                return;
            }
            _connectedSocket = socket;
            _connectError = error;
        }
        ulong one = 1;
        _ = Libc.write(_connectFd, &one, sizeof(ulong));
    }

    private void OnConnected(IBackendRing ring)
    {
        Socket? client;
        Exception? error;
        lock (_connectLock)
        {
            client = _connectedSocket;
            error = _connectError;
            _connectedSocket = null;
            _connectError = null;
        }
        if (client is null && error is null)
        {
            // Woken by OnQueueEnding, or a spurious count: nothing arrived.
            if (_connecting && !_ending)
            {
                ref var sqe = ref ring.GetSqe(IBackendRing.NoTag, Step(StepConnected), out var ud);
                sqe.PrepareRead(_connectFd, _connectBuffer, sizeof(ulong), 0, ud);
                _connectReadPending = true;
            }
            return;
        }
        _connecting = false;
        if (_ending)
        {
            client?.Dispose();
            return;
        }
        if (client is not null)
        {
            _backoffMs = 50;
            _nextAttempt = 0;
            _connection = Open(client);
            _connection.Receiving = true;
            SubmitRecv(ring);
            SendNext(ring);
            return;
        }
        Report($"cannot reconnect: {error!.Message}");
        _nextAttempt = Environment.TickCount64 + _backoffMs;
        _backoffMs = Math.Min(_backoffMs * 2, 1000);
        if (error is NbdHandshakeException || _down)
        {
            // Refused (retrying will not help), or down already: the waiting requests fail now.
            FailAll(ring);
        }
        else
        {
            FailLate(ring, Environment.TickCount64);
        }
        ArmTimer(ring);
    }

    private void FailAll(IBackendRing ring)
    {
        _sendQueue.Clear();
        for (var tag = 0; tag < _slots.Length; tag++)
        {
            _slots[tag].Queued = false;
            if (_slots[tag].Active)
            {
                _down = true;
                End(ring, tag, -Errno.EIO);
            }
        }
    }

    private Connection Open(Socket socket)
    {
        // Never blocks the queue thread (NBD_CMD_DISC at the end is sent only if it fits at once).
        socket.Blocking = false;
        return new Connection(socket, ++_generation);
    }

    public override void OnQueueEnding(IBackendRing ring)
    {
        _ending = true;
        if (_timerArmed)
        {
            ref var sqe = ref ring.GetSqe(IBackendRing.NoTag, Step(StepIgnore), out var ud);
            sqe.PrepareCancel(_timerUserData, CancelFlags.None, ud);
        }
        if (_connectReadPending)
        {
            ulong one = 1;
            _ = Libc.write(_connectFd, &one, sizeof(ulong));
        }
        var c = _connection;
        if (c is not null)
        {
            _connection = null;
            Disconnect(c);
            if (c.Outstanding > 0)
            {
                _closing.Add(c);
            }
            else
            {
                c.Socket.Dispose();
            }
        }
    }

    /// <summary>Says goodbye (NBD_CMD_DISC, if the socket takes it at once) and shuts the connection down.</summary>
    private static void Disconnect(Connection c)
    {
        Span<byte> h = stackalloc byte[RequestSize];
        h.Clear();
        BinaryPrimitives.WriteUInt32BigEndian(h, RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(h[6..], CmdDisc);
        try
        {
            c.Socket.Send(h, SocketFlags.None, out _);
            c.Socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    private void Report(string what)
    {
        // The first few say what happened; after that only the reconnect count grows.
        if (++_reported <= 10)
        {
            TargetLog.NbdConnection(_target.Logger, _target.Uri.ToString(), _queueId, what);
        }
    }

    protected override void Dispose(bool disposing)
    {
        lock (_connectLock)
        {
            _disposed = true;
            _connectedSocket?.Dispose();
            _connectedSocket = null;
        }
        if (_connection is not null)
        {
            Disconnect(_connection);
            _connection.Socket.Dispose();
            _connection = null;
        }
        foreach (var c in _closing)
        {
            c.Socket.Dispose();
        }
        _closing.Clear();
        _ = Libc.close(_connectFd);
        foreach (var p in _native)
        {
            NativeMemory.Free((void*)p);
        }
        _native = [];
        NativeMemory.Free(_reply);
        _reply = null;
        NativeMemory.Free(_connectBuffer);
        _connectBuffer = null;
        NativeMemory.Free(_tick);
        _tick = null;
        base.Dispose(disposing);
    }
}
