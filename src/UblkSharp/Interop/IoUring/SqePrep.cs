using System.Runtime.CompilerServices;

namespace UblkSharp.Interop.IoUring;

/// <summary>
/// Preparation helpers, liburing's io_uring_prep_* in managed form. They expect a zeroed SQE,
/// which <see cref="Ring.GetSqe"/> hands out, and set only the fields their op reads.
/// </summary>
public unsafe partial struct Sqe
{
    private void Rw(Opcode op, int fd, ulong address, uint length, ulong offset, ulong userData)
    {
        opcode = op;
        this.fd = fd;
        addr = address;
        len = length;
        off = offset;
        user_data = userData;
    }

    public void PrepareNop(ulong userData) => Rw(Opcode.Nop, -1, 0, 0, 0, userData);

    public void PrepareRead(int fd, void* buffer, uint length, ulong offset, ulong userData)
        => Rw(Opcode.Read, fd, (ulong)buffer, length, offset, userData);

    public void PrepareWrite(int fd, void* buffer, uint length, ulong offset, ulong userData, RwFlags rwFlags = RwFlags.None)
    {
        Rw(Opcode.Write, fd, (ulong)buffer, length, offset, userData);
        op_flags = (uint)rwFlags;
    }

    public void PrepareReadv(int fd, Iovec* iovecs, uint count, ulong offset, ulong userData, RwFlags rwFlags = RwFlags.None)
    {
        Rw(Opcode.Readv, fd, (ulong)iovecs, count, offset, userData);
        op_flags = (uint)rwFlags;
    }

    public void PrepareWritev(int fd, Iovec* iovecs, uint count, ulong offset, ulong userData, RwFlags rwFlags = RwFlags.None)
    {
        Rw(Opcode.Writev, fd, (ulong)iovecs, count, offset, userData);
        op_flags = (uint)rwFlags;
    }

    /// <summary>READ into a buffer registered with <see cref="Ring.RegisterBuffers"/>.</summary>
    public void PrepareReadFixed(int fd, void* buffer, uint length, ulong offset, ushort bufferIndex, ulong userData)
    {
        Rw(Opcode.ReadFixed, fd, (ulong)buffer, length, offset, userData);
        buf_index = bufferIndex;
    }

    /// <summary>WRITE from a registered buffer (<paramref name="buffer"/> is an address within it, or, for a buffer the kernel installed, an offset into it).</summary>
    public void PrepareWriteFixed(int fd, void* buffer, uint length, ulong offset, ushort bufferIndex, ulong userData, RwFlags rwFlags = RwFlags.None)
    {
        Rw(Opcode.WriteFixed, fd, (ulong)buffer, length, offset, userData);
        buf_index = bufferIndex;
        op_flags = (uint)rwFlags;
    }

    public void PrepareFsync(int fd, FsyncFlags fsyncFlags, ulong userData)
    {
        Rw(Opcode.Fsync, fd, 0, 0, 0, userData);
        op_flags = (uint)fsyncFlags;
    }

    /// <summary>fallocate(fd, mode, offset, length); liburing's encoding puts the length in addr and the mode in len.</summary>
    public void PrepareFallocate(int fd, FallocateMode mode, ulong offset, ulong length, ulong userData)
        => Rw(Opcode.Fallocate, fd, length, (uint)mode, offset, userData);

    /// <summary>sendmsg(fd, msg, flags): the msghdr and its iovecs must stay valid until the completion.</summary>
    public void PrepareSendMsg(int fd, MsgHdr* message, MsgFlags msgFlags, ulong userData)
    {
        Rw(Opcode.SendMsg, fd, (ulong)message, 1, 0, userData);
        op_flags = (uint)msgFlags;
    }

    /// <summary>recv(fd, buffer, length, flags).</summary>
    public void PrepareRecv(int fd, void* buffer, uint length, MsgFlags msgFlags, ulong userData)
    {
        Rw(Opcode.Recv, fd, (ulong)buffer, length, 0, userData);
        op_flags = (uint)msgFlags;
    }

    /// <summary>Cancels the request whose user_data is <paramref name="targetUserData"/>.</summary>
    public void PrepareCancel(ulong targetUserData, CancelFlags cancelFlags, ulong userData)
    {
        Rw(Opcode.AsyncCancel, -1, targetUserData, 0, 0, userData);
        op_flags = (uint)cancelFlags;
    }

    /// <summary>
    /// A timeout that completes with -ETIME after <paramref name="timespec"/>, or with 0 once
    /// <paramref name="count"/> other completions have happened. The timespec must stay valid until submit.
    /// </summary>
    public void PrepareTimeout(KernelTimespec* timespec, uint count, TimeoutFlags timeoutFlags, ulong userData)
    {
        Rw(Opcode.Timeout, -1, (ulong)timespec, 1, count, userData);
        op_flags = (uint)timeoutFlags;
    }

    /// <summary>
    /// IORING_OP_URING_CMD with <paramref name="payload"/> copied into sqe->cmd. The payload may be 16
    /// bytes on a normal ring and 80 bytes on an SQE128 ring; <see cref="Ring.GetSqe"/>'s caller must
    /// use <see cref="Ring.CmdCapacity"/> to know which (checked by <see cref="Ring.PrepareUringCmd{T}"/>).
    /// </summary>
    public void PrepareUringCmdUnchecked<T>(int fd, uint cmdOp, in T payload, ulong userData)
        where T : unmanaged
    {
        opcode = Opcode.UringCmd;
        this.fd = fd;
        cmd_op = cmdOp;
        user_data = userData;
        fixed (Sqe* self = &this)
        {
            Unsafe.WriteUnaligned((byte*)self + CmdOffset, payload);
        }
    }
}
