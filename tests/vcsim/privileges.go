package main

// Privileges the simulator grants, for testing `connector check`.
//
// govmomi's AuthorizationManager answers every privilege question with "granted".
// privilegeAuthz wraps it: while the file given with -privileges-file exists, it
// grants only the privileges listed there (one per line) to every user on every
// entity; without the file it grants everything, as the simulator does. The file
// is read at every call, so a test can change the grants of a running simulator.

import (
	"bufio"
	"os"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type privilegeAuthz struct {
	simulator.AuthorizationManager
	file string
}

func installPrivileges(ref types.ManagedObjectReference, file string) {
	am, ok := simulator.Map.Get(ref).(*simulator.AuthorizationManager)
	if !ok || file == "" {
		return
	}
	simulator.Map.Put(&privilegeAuthz{AuthorizationManager: *am, file: file})
}

// granted returns the granted privilege set, or nil when every privilege is granted.
func (a *privilegeAuthz) granted() map[string]bool {
	f, err := os.Open(a.file)
	if err != nil {
		return nil
	}
	defer f.Close()
	set := map[string]bool{}
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if line := strings.TrimSpace(scanner.Text()); line != "" {
			set[line] = true
		}
	}
	return set
}

func (a *privilegeAuthz) availability(entities []types.ManagedObjectReference, ids []string) []types.EntityPrivilege {
	set := a.granted()
	var out []types.EntityPrivilege
	for _, e := range entities {
		p := types.EntityPrivilege{Entity: e}
		for _, id := range ids {
			p.PrivAvailability = append(p.PrivAvailability, types.PrivilegeAvailability{
				PrivId:    id,
				IsGranted: set == nil || set[id],
			})
		}
		out = append(out, p)
	}
	return out
}

func (a *privilegeAuthz) HasPrivilegeOnEntities(req *types.HasPrivilegeOnEntities) soap.HasFault {
	return &methods.HasPrivilegeOnEntitiesBody{
		Res: &types.HasPrivilegeOnEntitiesResponse{Returnval: a.availability(req.Entity, req.PrivId)},
	}
}

func (a *privilegeAuthz) HasUserPrivilegeOnEntities(req *types.HasUserPrivilegeOnEntities) soap.HasFault {
	return &methods.HasUserPrivilegeOnEntitiesBody{
		Res: &types.HasUserPrivilegeOnEntitiesResponse{Returnval: a.availability(req.Entities, req.PrivId)},
	}
}

func (a *privilegeAuthz) HasPrivilegeOnEntity(req *types.HasPrivilegeOnEntity) soap.HasFault {
	set := a.granted()
	out := make([]bool, len(req.PrivId))
	for i, id := range req.PrivId {
		out[i] = set == nil || set[id]
	}
	return &methods.HasPrivilegeOnEntityBody{Res: &types.HasPrivilegeOnEntityResponse{Returnval: out}}
}
